"""mmfast's LLaVA with any transformers causal LM as its language model (llava_with_language_model): the
model loaded from a local directory runs on mmfast attention, packed, and gives what transformers gives
for each conversation alone; a Llama gives what mmfast's own decoder gives with the same weights; the
saved model rebuilds from its config; it trains, generates and takes LoRA."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from mmfast.models.clip import VisionConfig  # noqa: E402
from mmfast.models.llama import from_hf_causal_lm  # noqa: E402
from mmfast.models.llava import Llava, LlavaConfig, llava_with_language_model  # noqa: E402

IMAGE = 5
CONFIG = LlavaConfig(vision=VisionConfig(image_size=16, patch_size=8, width=32, layers=2, heads=2),
                     image_token_id=IMAGE, vision_feature_layer=-1)


def _saved(tmp_path, hf_config):
    """A random causal LM written to and read back from a local directory, as users load theirs."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    with torch.no_grad():
        for parameter in model.parameters():  # norms start at one (or zero for Gemma): make them count
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path / "lm")
    return transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lm")


def _batch(image_tokens: int):
    """Two packed conversations, the first with an image; labels shifted by one inside each."""
    first = torch.tensor([1, *[IMAGE] * image_tokens, 7, 8, 9, 10])
    second = torch.tensor([1, 11, 12, 13, 14, 15])
    ids = torch.cat([first, second])
    cu_seqlens = torch.tensor([0, len(first), len(ids)], dtype=torch.int32)
    labels = torch.cat([torch.cat([first[1:], torch.tensor([-100])]), torch.cat([second[1:], torch.tensor([-100])])])
    labels[labels == IMAGE] = -100
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return ids, cu_seqlens, labels, pixels, (first, second)


def test_any_causal_lm_gives_transformers_own_losses_packed(tmp_path):
    """Gemma (its norms, scaled embeddings and GELU are not mmfast's decoder's): each packed conversation's
    per-token losses are transformers' on that conversation alone (eager attention), images inserted."""
    hf_config = transformers.GemmaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                         max_position_embeddings=64)
    causal_lm = _saved(tmp_path, hf_config)
    model = llava_with_language_model(causal_lm, CONFIG).eval()
    assert model.config.text.hidden_size == 32 and model.config.text_hf["model_type"] == "gemma"
    ids, cu_seqlens, labels, pixels, rows = _batch(model.image_tokens)
    losses = model(ids, pixels, cu_seqlens=cu_seqlens, labels=labels)

    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lm", attn_implementation="eager").eval()
    embeds = model.embeddings(ids, pixels).detach()
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        logits = reference(inputs_embeds=embeds[None, start:end]).logits[0]
        expected = F.cross_entropy(logits, labels[start:end], reduction="none", ignore_index=-100)
        torch.testing.assert_close(losses[start:end], expected, atol=2e-5, rtol=1e-5)
    losses.sum().backward()  # gradients reach the LM's own weights and the projector
    assert causal_lm.base_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_a_llama_gives_what_mmfasts_decoder_gives_and_rebuilds_from_its_config(tmp_path):
    hf_config = transformers.LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    causal_lm = _saved(tmp_path, hf_config)
    model = llava_with_language_model(causal_lm, CONFIG).eval()
    ours = Llava(dataclasses.replace(model.config, text=from_hf_causal_lm(causal_lm).config, text_hf={})).eval()
    ours.load_state_dict(model.state_dict())  # HF's decoder names are mmfast's
    ids, cu_seqlens, labels, pixels, (first, _) = _batch(model.image_tokens)
    with torch.no_grad():
        expected = ours(ids, pixels, cu_seqlens=cu_seqlens, labels=labels)
        torch.testing.assert_close(model(ids, pixels, cu_seqlens=cu_seqlens, labels=labels), expected,
                                   atol=1e-5, rtol=1e-5)
        rebuilt = Llava(model.config).eval()  # what loading a saved run does: the HF decoder from text_hf
        rebuilt.load_state_dict(model.state_dict())
        assert type(rebuilt.model.language_model) is type(causal_lm.base_model)
        torch.testing.assert_close(rebuilt(ids, pixels, cu_seqlens=cu_seqlens, labels=labels), expected,
                                   atol=1e-5, rtol=1e-5)
    prompt = first[:-2]
    new = model.generate_packed([prompt, torch.tensor([1, 11, 12])], pixels, max_new_tokens=4)
    assert [row.tolist() for row in new] == [row.tolist() for row in ours.generate_packed(
        [prompt, torch.tensor([1, 11, 12])], pixels, max_new_tokens=4)]
    assert len(model.blocks()) == 2
    with_bias = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with_bias.lm_head = torch.nn.Linear(16, 40, bias=True)
    with pytest.raises(ValueError, match="bias-free output head"):
        llava_with_language_model(with_bias, CONFIG)


def test_lora_goes_on_the_transformers_decoder(tmp_path):
    pytest.importorskip("peft")
    from mmfast.models.lora import LoraConfig, add_lora

    hf_config = transformers.Qwen2Config(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = llava_with_language_model(_saved(tmp_path, hf_config), CONFIG)
    ids, cu_seqlens, labels, pixels, _ = _batch(model.image_tokens)
    before = model(ids, pixels, cu_seqlens=cu_seqlens, labels=labels).detach()
    add_lora(model.model.language_model, LoraConfig(rank=4, alpha=8))
    losses = model(ids, pixels, cu_seqlens=cu_seqlens, labels=labels)
    torch.testing.assert_close(losses, before)  # B starts at zero: the same model
    losses.sum().backward()
    trained = {name for name, parameter in model.model.language_model.named_parameters() if parameter.grad is not None}
    assert trained and all("lora_" in name for name in trained)
    assert any(name.endswith("q_proj.lora_B.default.weight") for name in trained)


def test_an_hf_llava_with_any_language_model_converts_both_ways():
    """from_hf_llava keeps a language model mmfast's decoder does not cover (Gemma here) as transformers'
    own: the same logits as HF's LLaVA, and to_hf_llava gives the weights back."""
    from mmfast.models.llava import from_hf_llava, to_hf_llava

    torch.manual_seed(2)
    text = transformers.GemmaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=1, head_dim=8)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=16, patch_size=8)
    hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE, vision_feature_layer=-1,
        image_seq_length=4, attn_implementation="eager")).eval()
    ids = torch.tensor([[1, IMAGE, IMAGE, IMAGE, IMAGE, 7, 8, 9]])
    pixels = torch.randn(1, 3, 16, 16)
    model = from_hf_llava(hf).eval()
    assert model.config.text_hf["model_type"] == "gemma"
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels).logits
        torch.testing.assert_close(model(ids, pixels), expected, atol=1e-4, rtol=1e-4)
        back = to_hf_llava(model).eval()
        back.set_attn_implementation("eager")
        torch.testing.assert_close(back(input_ids=ids, pixel_values=pixels).logits, expected, atol=1e-5, rtol=1e-5)


def _language_model_directory(root):
    """A random Qwen2 and a byte-level BPE without LLaVA's tokens, saved as transformers saves them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tokenizer.train_from_iterator(["what color is the shape? red green blue circle square star"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory = root / "lm"
    hf_config = transformers.Qwen2Config(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(hf_config).save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory, tokenizer


def hf_llava_config(root, name, *extra):
    """Stage 2 of llava-tiny on the Qwen2 of root/lm (module level: spawned processes import it)."""
    from mmfast.train import load_config
    from tests.test_llava_train import STAGES, TINY

    text = [item for item in TINY if not item.startswith("--model.text.")]
    config = load_config("llava-tiny", [*text, *STAGES["tune"], "--train.checkpoint_every=2",
                                        f"--data.synth_dir={root / 'synth'}", f"--model.language_model_from={root / 'lm'}",
                                        *extra])
    config.stages, config.run_dir = [], str(root / name)
    return config


def test_task_llava_trains_a_transformers_language_model_from_its_directory(tmp_path):
    """model.language_model_from: the directory's model and tokenizer (<image> and </s> added, embeddings
    grown), trained packed, exported and loaded back as the same transformers decoder."""
    import mmfast
    from mmfast.train import load_config, train
    from tests.test_llava_train import TINY

    _, tokenizer = _language_model_directory(tmp_path)
    text = [item for item in TINY if not item.startswith("--model.text.")]
    train(hf_llava_config(tmp_path, "run", "--train.steps=2"), progress=False)
    model, processor = mmfast.load_llava(str(tmp_path / "run"))
    run_tokenizer = processor.tokenizer
    assert run_tokenizer.get_vocab_size() == tokenizer.get_vocab_size() + 2  # <image> and </s>
    assert type(model.model.language_model).__name__ == "Qwen2Model"
    assert model.config.text.vocab_size >= run_tokenizer.get_vocab_size()
    prompt = torch.tensor(run_tokenizer.encode("what color").ids)
    assert len(model.generate_packed([prompt], max_new_tokens=3)[0]) == 3

    missing = load_config("llava-tiny", [*text, f"--model.language_model_from={tmp_path / 'nowhere'}"])
    missing.stages, missing.run_dir = [], str(tmp_path / "refused")
    with pytest.raises(ValueError, match="has no config.json or tokenizer.json"):
        train(missing, progress=False)
    assert not (tmp_path / "refused").exists()



@pytest.mark.parametrize("image_attention", ["causal", "bidirectional"])
def test_generation_with_transformers_cache_equals_recomputing(tmp_path, image_attention):
    """An HF decoder generates against transformers' DynamicCache (the prompts left-padded, one token a
    step): the same tokens as running the whole sequences every step, rows stopping at their eos."""
    hf_config = transformers.LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config = dataclasses.replace(CONFIG, image_attention=image_attention)
    model = llava_with_language_model(_saved(tmp_path, hf_config), config).eval()
    _, _, _, pixels, (first, second) = _batch(model.image_tokens)
    prompts = [first[:-2], torch.tensor([1, 11, 12]), second]
    recomputed = model.generate_packed(prompts, pixels, max_new_tokens=6, use_cache=False)
    assert len({tuple(row.tolist()) for row in recomputed}) == 3 and len(set(recomputed[0].tolist())) > 1
    cached = model.generate_packed(prompts, pixels, max_new_tokens=6)
    assert [row.tolist() for row in cached] == [row.tolist() for row in recomputed]
    eos = int(recomputed[1][1])  # the second row stops after two tokens
    stopped = model.generate_packed(prompts, pixels, max_new_tokens=6, eos_token_id=eos)
    assert stopped[1].tolist() == recomputed[1][:2].tolist()
    assert [row.tolist() for row in stopped] == [row.tolist() for row in model.generate_packed(
        prompts, pixels, max_new_tokens=6, eos_token_id=eos, use_cache=False)]


@pytest.mark.distributed
def test_engines_around_a_transformers_decoder_follow_one_process(tmp_path):
    """DDP, FSDP2 (each decoder layer of the transformers model a shard unit) and DeepSpeed ZeRO-2 / ZeRO-3
    on two processes give the single process's stage-2 losses on the same global batch."""
    import importlib

    from tests.processes import launch_training
    from tests.runs import losses

    _language_model_directory(tmp_path)
    launch_training(hf_llava_config, tmp_path, [("single", [])], world=1)
    runs = [("ddp", ["--engine.name=ddp"]), ("fsdp2", ["--engine.name=fsdp2"])]
    if importlib.util.find_spec("deepspeed") is not None:
        runs += [(f"zero{stage}", ["--engine.name=deepspeed", f"--engine.zero_stage={stage}"]) for stage in (2, 3)]
    launch_training(hf_llava_config, tmp_path, runs, world=2)
    reference = list(losses(tmp_path / "single").values())
    assert len(reference) == 4 and all(0 < loss < 20 for loss in reference)
    for name, _ in runs:
        assert list(losses(tmp_path / name).values()) == pytest.approx(reference, abs=2e-4), name
