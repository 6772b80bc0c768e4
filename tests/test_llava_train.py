"""Task llava in the trainer: LLaVA's stage 1 (projector alone, captions) and stage 2 (projector and
language model, conversations) on two CPU processes (DDP, FSDP2, DeepSpeed ZeRO-2 / ZeRO-3) follow the
single process on the same global batch; the frozen tower never moves; the llava-tiny recipe's stages
chain (a CLIP's tower, the tokenizer) and report VQA and POPE; bad settings are named."""
import json
import os

import pytest
import torch

from mmfast.train import load_config, train
from tests.processes import launch_training
from tests.runs import losses, prepared_task

pytest.importorskip("tokenizers")
TINY = ["--data.train_samples=48", "--data.held_out_samples=8", "--data.batch_size=8", "--data.image_size=16",
        "--model.vision.width=32", "--model.vision.layers=2", "--model.vision.heads=2",
        "--model.vision.patch_size=8", "--model.vision.patch_stride=8",
        "--model.text.vocab_size=300", "--model.text.hidden_size=64", "--model.text.intermediate_size=128",
        "--model.text.num_hidden_layers=2", "--model.text.num_attention_heads=2",
        "--model.text.num_key_value_heads=1", "--train.steps=4", "--train.eval_every=100",
        "--train.checkpoint_every=2", "--train.log_every=1", "--optim.warmup_steps=1", "--optim.lr=3e-3"]
STAGES = {"align": ["--data.template=plain", "--train.trainable=[model.multi_modal_projector]"],
          "tune": ["--data.template=vicuna_v1",
                   "--train.trainable=[model.multi_modal_projector,model.language_model,lm_head]"],
          # stage 2 with LoRA on the language model's linear layers, the projector in full
          "lora": ["--data.template=vicuna_v1", "--train.trainable=[model.multi_modal_projector]",
                   "--model.lora.rank=4", "--model.lora.alpha=8"],
          # QLoRA: the same with the adapted layers' base weights in 4-bit NF4 (single and DDP)
          "qlora": ["--data.template=vicuna_v1", "--train.trainable=[model.multi_modal_projector]",
                    "--model.lora.rank=4", "--model.lora.alpha=8", "--model.lora.quantize=nf4"]}


def _config(root, name, *extra):
    config = load_config("llava-tiny", [*TINY, f"--data.synth_dir={root / 'synth'}", *extra])
    config.stages, config.run_dir = [], str(root / name)
    return config


def _launch(root, runs, world=2):
    launch_training(_config, root, runs, world)


def _weights(run_dir):
    return torch.load(os.path.join(run_dir, "model.pt"), weights_only=False)["state_dict"]


@pytest.mark.distributed
def test_both_stages_follow_the_single_process_on_every_engine(tmp_path):
    has_deepspeed = __import__("importlib").util.find_spec("deepspeed") is not None
    _launch(tmp_path, [(f"{stage}-single", STAGES[stage]) for stage in STAGES], world=1)
    runs = []
    # the ZeRO stages LLaVA trains its stages with; QLoRA runs on single and DDP only
    for stage, zero in (("align", 2), ("tune", 3), ("lora", 3), ("qlora", None)):
        runs.append((f"{stage}-ddp", ["--engine.name=ddp", *STAGES[stage]]))
        if zero:
            runs.append((f"{stage}-fsdp2", ["--engine.name=fsdp2", *STAGES[stage]]))
        if zero and has_deepspeed:
            runs.append((f"{stage}-zero{zero}", ["--engine.name=deepspeed", f"--engine.zero_stage={zero}",
                                                 *STAGES[stage]]))
    _launch(tmp_path, runs)
    for stage in STAGES:
        reference = list(losses(tmp_path / f"{stage}-single").values())
        assert len(reference) == 4 and all(0 < loss < 10 for loss in reference)
        single = _weights(tmp_path / f"{stage}-single")
        for name, _ in runs:
            if name.startswith(stage + "-"):
                assert list(losses(tmp_path / name).values()) == pytest.approx(reference, abs=2e-4), name
                weights = _weights(tmp_path / name)
                for key in single:
                    torch.testing.assert_close(weights[key], single[key], atol=1e-4, rtol=0, msg=f"{name} {key}")
    tower_keys = {key for key in _weights(tmp_path / "tune-single") if key.startswith("model.vision_tower.")}
    for name in ("tune-zero3", "lora-zero3"):  # ZeRO-3 keeps the frozen tower whole, out of its partitions
        folder = tmp_path / name / "checkpoints" / "step-0000004"
        if folder.exists():
            assert torch.load(folder / "towers.pt", weights_only=True).keys() == tower_keys, name
    # what is not trainable never moves: the tower in every stage, the language model in stage 1, its
    # norms and embeddings under LoRA (whose merged linear layers do move)
    align, tune, lora = (_weights(tmp_path / f"{stage}-single") for stage in ("align", "tune", "lora"))
    for key in align:
        same = torch.equal(align[key], tune[key])  # all started from the same seed's weights
        if key.startswith("model.vision_tower."):
            assert same and torch.equal(align[key], lora[key]), key
        elif key.startswith("model.multi_modal_projector."):
            assert not same and not torch.equal(align[key], lora[key]), key
        elif key.startswith("model.language_model."):
            adapted = key.endswith("_proj.weight")
            assert torch.equal(align[key], lora[key]) != adapted, key


@pytest.mark.distributed
def test_bf16_with_checkpointed_blocks_follows_fp32(tmp_path):
    """Stage 2 in bf16 with the language model's blocks recomputed in backward, in one process and on
    two under ZeRO-3 (the frozen tower whole on each rank, held in bf16), stays near the fp32 losses."""
    bf16 = ["--engine.precision=bf16", "--engine.activation_checkpointing=true", *STAGES["tune"]]
    _launch(tmp_path, [("fp32", STAGES["tune"]), ("bf16", bf16)], world=1)
    runs = [("bf16-ddp", ["--engine.name=ddp", *bf16])]
    if __import__("importlib").util.find_spec("deepspeed") is not None:
        runs.append(("bf16-zero3", ["--engine.name=deepspeed", "--engine.zero_stage=3", *bf16]))
    _launch(tmp_path, runs)
    reference = list(losses(tmp_path / "fp32").values())
    assert len(reference) == 4
    for name in ["bf16", *(name for name, _ in runs)]:
        found = list(losses(tmp_path / name).values())
        assert found == pytest.approx(reference, abs=5e-2), name
        assert found != reference, name  # bf16 did run: its rounding shows


def test_the_recipe_chains_a_clip_tower_and_one_tokenizer_and_scores_answers(tmp_path, capsys, monkeypatch):
    """llava-tiny's stages at toy size: the CLIP stage's tower is the tower of every later stage."""
    overrides = [*TINY, f"--data.synth_dir={tmp_path / 'synth'}"]
    config = load_config("llava-tiny", overrides)
    for stage in config.stages:  # toy lengths for every stage, the CLIP's batch and pictures too
        stage.setdefault("train", {}).update(steps=2, eval_every=2, checkpoint_every=2)
        if stage["name"] == "clip":
            stage["data"].update(train_samples=64, held_out_samples=40, batch_size=16)
            stage["model"]["text"].update(width=32, layers=1, heads=2, vocab_size=200)
            stage["model"]["embed_dim"] = 16
    config.run_dir = str(tmp_path / "run")
    result = train(config, progress=False)
    assert {"vqa_accuracy", "vqa_color", "vqa_shape", "pope_f1", "pope_yes_ratio", "held_out_loss",
            "other_vqa_color", "other_vqa_shape", "caption_bleu4", "caption_cider", "choice_circular",
            "choice_single"} <= result.keys()
    clip = _weights(tmp_path / "run" / "clip")
    final = _weights(tmp_path / "run" / "tune")
    for key, value in clip.items():
        if key.startswith("vision_model.layers.0."):
            torch.testing.assert_close(final["model.vision_tower." + key[len("vision_model."):]], value)
    stages = ("text", "align", "tune")
    tokenizers = [open(tmp_path / "run" / name / "tokenizer.json").read() for name in stages]
    assert all(tokenizer == tokenizers[0] for tokenizer in tokenizers)
    # the language model first reads the words of the conversations that all open with the existence
    # question (no pictures), stage 2 the plain conversations
    configs = [load_config(path=str(tmp_path / "run" / name / "config.yaml")).data for name in stages]
    assert [(data.existence_first, data.use_images) for data in configs] == [(True, False), (False, True), (False, True)]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "tune" / "metrics.jsonl")]
    assert any("pope_f1" in row for row in rows)
    logged = [row for row in rows if "loss" in row]  # each step: real tokens, and what padding would keep real
    assert logged and all(row["tokens"] > 0 and 0 < row["padded_efficiency"] <= 1 for row in logged)
    _use_as_the_readme_says(tmp_path / "run", capsys, monkeypatch)


def _use_as_the_readme_says(run_dir, capsys, monkeypatch):
    import mmfast
    from mmfast.cli import main
    from PIL import Image

    model, processor = mmfast.load_llava(str(run_dir))  # the last stage of the multi-stage run
    image = Image.new("RGB", (40, 40), "white")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("USER: <image>What color is the shape? ASSISTANT:")
    inputs = processor(images=[image, image], text=[prompt, prompt.replace("color", "color and the shape")], return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, 16, 16) and inputs["attention_mask"][0, 0] == 0  # left padding
    out = model.generate(**inputs, max_new_tokens=4)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
    with pytest.raises(ValueError, match="hold 1 '<image>' and 2 images"):
        processor(images=[image, image], text=[prompt])
    image.save(run_dir / "white.png")
    assert main(["generate", str(run_dir), "--image", str(run_dir / "white.png"), "--prompt", "What shape is it?",
                 "--max-new-tokens", "3"]) == 0
    capsys.readouterr()  # the toy model's answer (it may be empty)
    replies = iter(["What color is it?", "And the shape?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(replies))
    assert main(["chat", str(run_dir), "--image", str(run_dir / "white.png"), "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.count("model:") == 2
    with pytest.raises(ValueError, match="not a LLaVA"):
        mmfast.load_llava(str(run_dir / "clip"))


def test_a_qlora_run_resumes_exactly(tmp_path):
    """The 4-bit layers' quantization statistics, saved by bitsandbytes beside each weight, load back."""
    pytest.importorskip("bitsandbytes")
    train(_config(tmp_path, "whole", *STAGES["qlora"]), progress=False)
    train(_config(tmp_path, "part", *STAGES["qlora"], "--train.stop_after=2"), progress=False)
    train(_config(tmp_path, "part", *STAGES["qlora"]), progress=False)
    assert losses(tmp_path / "part") == losses(tmp_path / "whole")
    whole, part = _weights(tmp_path / "whole"), _weights(tmp_path / "part")
    assert all(torch.equal(whole[key], part[key]) for key in whole)
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in whole  # merged: a plain Llava's keys


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="data.template must be one of"):
        load_config("llava-tiny", ["--data.template=alpaca"])
    config = _config(tmp_path, "bad", "--data.source=shards")
    with pytest.raises(ValueError, match="task llava reads LLaVA's JSON"):
        train(config, progress=False)
    config = _config(tmp_path, "bad-files", "--data.source=files")
    with pytest.raises(ValueError, match="needs data.conversations"):
        train(config, progress=False)
    for setting in ("--data.source=files", "--data.template=plain"):
        config = _config(tmp_path, "existence", "--data.existence_first=true", setting)
        with pytest.raises(ValueError, match="data.existence_first picks a set of the bundled conversations"):
            train(config, progress=False)
    config = _config(tmp_path, "anyres", *STAGES["tune"], "--data.image_size=32", "--model.vision.image_size=16")
    config.model.image_grid_pinpoints = [[24, 32]]
    with pytest.raises(ValueError, match=r"multiples of the tower's 16-pixel input, got \[24, 32\]"):
        train(config, progress=False)
    config = _config(tmp_path, "qlora-fsdp2", *STAGES["qlora"], "--engine.name=fsdp2")
    with pytest.raises(ValueError, match="QLoRA.*single and ddp"):
        train(config, progress=False)
    config = _config(tmp_path, "lora-names", *STAGES["lora"], "--model.lora.target_modules=[q_proj,c_attn]")
    with pytest.raises(ValueError, match="c_attn"):
        train(config, progress=False)
    assert not os.path.exists(tmp_path / "lora-names")  # refused before the run directory is made
    # a CLIP whose tower is not the one the model builds: its differences named
    vision = dict(image_size=16, patch_size=8, patch_stride=8, channels=3, width=48, layers=1, heads=2, mlp_ratio=4.0)
    torch.save({"task": "contrastive", "clip_config": {"vision": vision, "activation": "gelu"}, "state_dict": {}},
               tmp_path / "clip.pt")
    config = _config(tmp_path, "tower", *STAGES["align"], f"--train.init_from={tmp_path / 'clip.pt'}")
    with pytest.raises(ValueError, match=r"width 48 \(the model's: 32\), layers 1 \(the model's features come"):
        train(config, progress=False)
    config = _config(tmp_path, "tower-from", *STAGES["align"], f"--model.vision_from={tmp_path / 'clip.pt'}",
                     "--data.image_size=32")
    with pytest.raises(ValueError, match="takes 16-pixel images, data.image_size is 32"):
        train(config, progress=False)
    config = _config(tmp_path, "missing", "--data.source=files", f"--data.conversations={tmp_path / 'none.json'}")
    with pytest.raises(FileNotFoundError, match="none.json"):
        train(config, progress=False)


def test_anyres_gives_larger_pictures_their_tiles_tokens_in_training_and_evaluation(tmp_path):
    """model.image_grid_pinpoints: 32-pixel pictures before a 16-pixel tower become an overview and four
    tiles (five tower inputs, five times the image tokens), packed as they are; evaluation (VQA, POPE,
    multiple choice, pictures drawn another way) asks about the same tiles."""
    config = _config(tmp_path, "anyres", *STAGES["tune"], "--data.image_size=32", "--model.vision.image_size=16",
                     "--train.steps=2", "--train.eval_every=2", "--train.checkpoint_every=2")
    config.model.image_grid_pinpoints = [[32, 32]]
    result = train(config, progress=False)
    assert {"vqa_accuracy", "pope_f1", "other_vqa_color", "choice_circular"} <= result.keys()
    task = prepared_task(config)
    assert task.model_config.vision.image_size == 16 and task.image_tokens == 5  # 2 x 2 patches and the class token
    sample = next(sample for sample in task.train_encoded if sample.image is not None)
    assert task.pixels[sample.image].shape == (5, 3, 16, 16)
    assert int((sample.input_ids == task.model_config.image_token_id).sum()) == 5 * 5
    input_ids, _, _, pixels = task._pack(task.train_encoded[:4])
    assert int((input_ids == task.model_config.image_token_id).sum()) == 5 * len(pixels)
