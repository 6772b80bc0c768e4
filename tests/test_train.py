"""The contrastive trainer on the bundled data (tiny sizes): run files, metrics, exact resume, and
configuration errors that name the key."""
import json
import os

import numpy as np
import pytest
import torch
import yaml

import mmfast
from mmfast.cli import main
from mmfast.train import load_config, train
from tests.runs import losses, run_config

pytest.importorskip("webdataset")
TINY = ["--data.train_samples=256", "--data.held_out_samples=64", "--data.batch_size=32",
        "--model.text.vocab_size=200", "--model.text.context_length=16", "--model.vision.width=64",
        "--model.vision.layers=1", "--model.vision.heads=2", "--model.text.width=64", "--model.text.layers=1",
        "--model.text.heads=2", "--model.embed_dim=32",
        "--train.steps=6", "--train.eval_every=3", "--train.checkpoint_every=3", "--train.log_every=1",
        "--optim.warmup_steps=2"]


def _config(tmp_path, name, *extra):
    return run_config(tmp_path, name, TINY, *extra)


def test_a_run_writes_its_directory(tmp_path):
    result = train(_config(tmp_path, "run"), progress=False)
    run = tmp_path / "run"
    assert sorted(os.listdir(run)) == ["checkpoints", "config.yaml", "curves.png", "metrics.jsonl", "model.pt",
                                       "tensorboard", "tokenizer.json"]
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step-0000003", "step-0000006"]
    assert (run / "checkpoints" / "latest").read_text() == "step-0000006"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 6
    assert 0.0 <= result["zero_shot_accuracy"] <= 1.0 and result["step"] == 6
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert {"lr", "grad_norm", "samples_per_s", "tokens_per_s", "tflops_per_s", "peak_memory_mb",
            "logit_scale"} <= set(rows[0])
    assert "mfu" not in rows[0]  # no known peak for a CPU
    assert [r["step"] for r in rows if "zero_shot_accuracy" in r] == [3, 6]
    other = rows[-1]  # the bundled vocabulary drawn another way, beside the held-out split
    assert all(0.0 <= other[f"other_{kind}{band}"] <= 1.0 for kind in ("zero_shot_accuracy", "color_accuracy",
               "shape_accuracy") for band in ("", "_dark", "_mid", "_light"))
    board = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = board.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [event.value for event in events.Scalars("eval/zero_shot_accuracy")] == pytest.approx(
        [r["zero_shot_accuracy"] for r in rows if "zero_shot_accuracy" in r])


def test_load_clip_and_eval_give_the_run_scores(tmp_path, capsys):
    result = train(_config(tmp_path, "run"), progress=False)
    model, preprocess, tokenizer = mmfast.load_clip(str(tmp_path / "run"))
    from mmfast.train.checkpoint import consolidate

    trained = consolidate(str(tmp_path / "run" / "checkpoints" / "step-0000006"))
    assert all(torch.equal(model.state_dict()[key], value) for key, value in trained.items())
    image = preprocess(np.full((40, 50, 3), 200, np.uint8))
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    features = model.encode_image(image[None], normalize=True)
    assert features.shape == (1, 32) and torch.allclose(features.norm(dim=-1), torch.ones(1))
    assert model.encode_text(tokenizer(["a red star."])).shape == (1, 32)
    assert main(["eval", str(tmp_path / "run")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["zero_shot_accuracy"] == pytest.approx(result["zero_shot_accuracy"])
    with pytest.raises(FileNotFoundError, match="neither a run directory nor a model file"):
        mmfast.load_clip(str(tmp_path / "nowhere"))


def test_export_consolidates_a_chosen_checkpoint(tmp_path):
    train(_config(tmp_path, "run"), progress=False)
    os.remove(tmp_path / "run" / "model.pt")
    assert main(["export", str(tmp_path / "run"), "--step", "3"]) == 0
    exported = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    step3 = torch.load(tmp_path / "run" / "checkpoints" / "step-0000003" / "state.pt", weights_only=False)["model"]
    assert all(torch.equal(exported["state_dict"][key], value) for key, value in step3.items())
    assert exported["clip_config"]["vision"]["width"] == 64


def test_precision_checkpointing_and_optimizer_options(tmp_path):
    """Activation checkpointing recomputes the same numbers; bf16 autocast and 8-bit AdamW train
    close to the fp32 run."""
    short = ["--train.steps=3", "--train.eval_every=3"]
    train(_config(tmp_path, "fp32", *short), progress=False)
    train(_config(tmp_path, "recomputed", *short, "--engine.activation_checkpointing=true"), progress=False)
    assert losses(tmp_path / "recomputed") == losses(tmp_path / "fp32")
    train(_config(tmp_path, "bf16", *short, "--engine.precision=bf16"), progress=False)
    assert list(losses(tmp_path / "bf16").values()) == pytest.approx(list(losses(tmp_path / "fp32").values()),
                                                                      abs=3e-2)
    pytest.importorskip("bitsandbytes")
    train(_config(tmp_path, "adam8", *short, "--optim.name=adamw8bit"), progress=False)
    assert list(losses(tmp_path / "adam8").values()) == pytest.approx(list(losses(tmp_path / "fp32").values()),
                                                                       abs=5e-2)
    with pytest.raises(ValueError, match="engine.precision=fp16 needs a CUDA device"):
        train(_config(tmp_path, "fp16", *short, "--engine.precision=fp16"), progress=False)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    train(_config(tmp_path, "straight"), progress=False)
    train(_config(tmp_path, "resumed", "--train.stop_after=3"), progress=False)
    assert sorted(losses(tmp_path / "resumed")) == [1, 2, 3]
    train(_config(tmp_path, "resumed"), progress=False)  # picks up checkpoints/latest (step 3)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def test_gradient_caching_run(tmp_path):
    train(_config(tmp_path, "cached", "--train.micro_batch=8", "--train.steps=2", "--train.eval_every=2"),
          progress=False)
    assert sorted(losses(tmp_path / "cached")) == [1, 2]


def test_configuration_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key 'optim.learning_rate'"):
        load_config("clip-tiny", ["--optim.learning_rate=1e-3"])
    with pytest.raises(ValueError, match=r"train.steps must be int, got 'many'"):
        load_config("clip-tiny", ["--train.steps=many"])
    with pytest.raises(ValueError, match="overrides look like --section.key=value"):
        load_config("clip-tiny", ["--optim.lr"])
    with pytest.raises(ValueError, match="no recipe 'clip-huge'"):
        load_config("clip-huge")
    config = load_config("clip-tiny", ["--optim.lr=3e-4", "--train.micro_batch=none", "--model.loss=siglip"])
    assert config.optim.lr == 3e-4 and config.train.micro_batch is None and config.model.loss == "siglip"
    with pytest.raises(ValueError, match=r"unknown key 'model.loss'"):  # the caption LM has no loss field
        load_config("clip-tiny", ["--task=caption_lm", "--model.loss=siglip"])
    with pytest.raises(ValueError, match=r"model.activation must be one of \['quick_gelu', 'gelu'\], got 'relu'"):
        load_config("clip-tiny", ["--model.activation=relu"])
    with pytest.raises(ValueError, match=r"model.vision.mean\[1\] must be float, got 'x'"):
        load_config("clip-tiny", ["--model.vision.mean=[0.5,x,0.5]"])


def test_every_model_field_is_a_key_of_the_task_model_section():
    from mmfast.models import CaptionLMConfig, ClipConfig
    from mmfast.train.tasks import build_task
    from mmfast.train.tasks.contrastive import model_config_of_run

    config = load_config("clip-tiny", ["--model.activation=gelu", "--model.init_logit_scale=2.5",
                                       "--model.vision.mean=[0.5,0.5,0.5]", "--model.vision.std=0.25,0.25,0.25"])
    assert isinstance(config.model, ClipConfig) and config.model.vision.mean == (0.5, 0.5, 0.5)
    task = build_task(config)
    task.model_config = model_config_of_run(config, vocab_size=50, eot_token_id=3)
    model = task.build_model()
    assert model.logit_scale.item() == 2.5 and model.logit_bias is None
    assert type(model.vision_model.layers[0].mlp.activation).__name__ == "GELU"
    assert model.vision_model.embeddings.mean == (0.5, 0.5, 0.5)
    assert model.vision_model.embeddings.std == (0.25, 0.25, 0.25)
    # the recipe's text sizes carry over to another task's model section; its own defaults stay
    lm = load_config("clip-tiny", ["--task=caption_lm", "--model.text.layers=2"])
    assert isinstance(lm.model, CaptionLMConfig) and lm.model.activation == "gelu"
    assert (lm.model.text.width, lm.model.text.layers, lm.model.text.context_length) == (128, 2, 16)


def test_profile_steps_write_a_trace_that_names_mmfast_ops(tmp_path):
    with pytest.raises(ValueError, match=r"train.profile_steps must look like FIRST-LAST .*got '3-2'"):
        load_config("clip-tiny", ["--train.profile_steps=3-2"])
    train(_config(tmp_path, "profiled", "--train.steps=3", "--train.eval_every=3", "--train.profile_steps=2-3"),
          progress=False)
    folder = tmp_path / "profiled" / "profile"
    assert sorted(os.listdir(folder)) == ["rank0.steps-2-3.pt.trace.json", "rank0.steps-2-3.txt"]
    events = json.loads((folder / "rank0.steps-2-3.pt.trace.json").read_text())["traceEvents"]
    names = {event.get("name") for event in events}
    assert {"mmfast.patch_embed", "mmfast.mixed_attention", "mmfast.similarity_logsumexp"} <= names
    assert "mmfast.patch_embed" in (folder / "rank0.steps-2-3.txt").read_text()


def test_cli_train_with_overrides(tmp_path, capsys):
    arguments = ["train", "--recipe", "clip-tiny", "--run-dir", str(tmp_path / "cli"), *TINY,
                 f"--data.synth_dir={tmp_path / 'synth'}", "--train.steps=2", "--train.eval_every=2"]
    assert main(arguments) == 0
    assert f"run directory: {tmp_path / 'cli'}" in capsys.readouterr().out


def test_compiled_blocks_give_the_eagerlosses(tmp_path):
    short = ["--train.steps=2", "--train.eval_every=2"]
    train(_config(tmp_path, "eager", *short), progress=False)
    train(_config(tmp_path, "compiled", *short, "--engine.compile=true"), progress=False)
    assert list(losses(tmp_path / "compiled").values()) == pytest.approx(
        list(losses(tmp_path / "eager").values()), abs=1e-4)


def test_a_tokenizer_file_on_disk_replaces_the_trained_one(tmp_path):
    from mmfast.data.tokenizer import CaptionTokenizer

    captions = ["a red star.", "two blue squares at the center."] * 20
    CaptionTokenizer.train(captions, vocab_size=60, context_length=8).save(str(tmp_path / "mine.json"))
    config = _config(tmp_path, "run", "--train.steps=1", "--train.eval_every=1",
                     f"--data.tokenizer={tmp_path / 'mine.json'}")
    train(config, progress=False)
    used = CaptionTokenizer.load(str(tmp_path / "run" / "tokenizer.json"))
    assert used.vocab_size == CaptionTokenizer.load(str(tmp_path / "mine.json")).vocab_size < 200
    assert used.context_length == 16  # the model's, not the file's 8
    assert torch.load(tmp_path / "run" / "model.pt", weights_only=False)["clip_config"]["text"]["vocab_size"] == \
        used.vocab_size


def _png(rng, height, width) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_training_on_ones_own_shards_and_files(tmp_path, capfd):
    """img2dataset-style shards and an open_clip-style CSV: images of any size are resized, a corrupt
    image and a missing file are skipped and reported, and retrieval is evaluated (zero-shot needs
    the bundled classes)."""
    import webdataset

    rng = np.random.default_rng(0)
    with webdataset.TarWriter(str(tmp_path / "mine-000000.tar")) as sink:
        for index in range(40):
            sink.write({"__key__": f"{index:05d}", "png": _png(rng, 40 + index, 50), "txt": f"picture {index}"})
        sink.write({"__key__": "broken", "png": b"not a png", "txt": "broken"})
    overrides = ["--data.source=shards", f"--data.train={tmp_path}/mine-*.tar", f"--data.held_out={tmp_path}/mine-*.tar",
                 "--train.steps=2", "--train.eval_every=2"]
    result = train(_config(tmp_path, "shards", *overrides), progress=False)
    assert "skipped 1 samples of train" in capfd.readouterr().out
    assert "zero_shot_accuracy" not in result and 0 <= result["image_to_text_R@1"] <= 1
    streamed = ["--data.streaming=true", "--data.workers=1", "--data.shuffle_buffer=8"]
    result = train(_config(tmp_path, "streamed", *overrides, *streamed), progress=False)
    assert "rank 0 skipped 1 samples" in capfd.readouterr().out  # the worker's report after a pass
    assert sorted(losses(tmp_path / "streamed")) == [1, 2] and 0 <= result["image_to_text_R@1"] <= 1
    (tmp_path / "images").mkdir()
    lines = ["filepath,title"]
    for index in range(40):
        (tmp_path / "images" / f"{index}.png").write_bytes(_png(rng, 32, 64))
        lines.append(f"images/{index}.png,a picture numbered {index}")
    lines.append("images/missing.png,gone")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    overrides = ["--data.source=files", f"--data.train={tmp_path / 'pairs.csv'}",
                 f"--data.held_out={tmp_path / 'pairs.csv'}", "--train.steps=2", "--train.eval_every=2"]
    result = train(_config(tmp_path, "files", *overrides), progress=False)
    assert "skipped 1 samples of train: {'missing file': 1}" in capfd.readouterr().out
    assert 0 <= result["text_to_image_R@1"] <= 1
    with pytest.raises(ValueError, match="data.train matches no shards"):
        train(_config(tmp_path, "none", "--data.source=shards", f"--data.train={tmp_path}/nothing-*.tar"),
              progress=False)


def test_streaming_shares_out_shards_without_overlap():
    from mmfast.data.stream import ShardStream

    shards = [f"s{index}.tar" for index in range(5)]
    mine = [ShardStream(shards, rank, 2, 32, 0, 8)._my_shards(shards) for rank in (0, 1)]
    assert sorted(mine[0] + mine[1]) == shards and not set(mine[0]) & set(mine[1])
    assert ShardStream(shards[:1], 1, 2, 32, 0, 8)._my_shards(shards[:1]) == shards[:1]  # fewer shards: shared
    with pytest.raises(ValueError, match="data.streaming reads webdataset shards"):
        train(load_config("clip-tiny", ["--data.streaming=true"]), progress=False)
