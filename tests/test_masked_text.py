"""Masked language modeling (task mlm): the bidirectional text tower never attends padding, the masking
follows BERT's proportions and never touches special tokens, the loss counts the picked tokens only,
two processes follow one, and the tower carries over to a contrastive run."""
import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast.models.clip import TextConfig, TextTransformer
from mmfast.models.masked_text import IGNORE, MaskedLanguageModel, MlmConfig, draw_masking
from mmfast.train import load_config, train
from tests.processes import assert_ddp_follows_one_process
from tests.runs import prepared_task

TEXT = ["--model.text.width=32", "--model.text.layers=1", "--model.text.heads=2"]
TINY = ["--data.train_samples=96", "--data.held_out_samples=16", "--data.batch_size=16", "--train.steps=4",
        "--train.eval_every=4", "--train.checkpoint_every=2", "--train.log_every=1", "--optim.warmup_steps=1", *TEXT]
PAD, SOT, EOT = 0, 1, 2


def mlm_config(root, name, *extra):
    config = load_config("mlm-tiny", [*TINY, f"--data.synth_dir={root / 'synth'}", *extra])
    config.run_dir = str(root / name)
    return config


def _config(**fields) -> MlmConfig:
    return MlmConfig(text=TextConfig(vocab_size=40, context_length=12, width=32, layers=2, heads=2, eot_token_id=EOT,
                                     causal=False), **fields)


def _rows(*lengths):
    """<sot> words <eot> <pad>..., `lengths` words each, padded to 12."""
    rows = torch.full((len(lengths), 12), PAD)
    for row, length in enumerate(lengths):
        rows[row, :length + 2] = torch.tensor([SOT, *torch.randint(4, 40, (length,)).tolist(), EOT])
    return rows


def test_the_bidirectional_tower_attends_each_rows_tokens_and_never_its_padding():
    torch.manual_seed(0)
    tower = TextTransformer(_config().text, "gelu").eval()
    rows = _rows(5, 2, 9)
    states = tower.hidden_states(rows)
    for row, length in enumerate((5, 2, 9)):  # alone and unpadded: the same states
        alone = tower.hidden_states(rows[row:row + 1, :length + 2])
        torch.testing.assert_close(states[row, :length + 2], alone[0], atol=1e-5, rtol=1e-5)
        assert states[row, length + 2:].abs().max() == 0
    other_padding = rows.clone()
    other_padding[rows == PAD] = 7  # whatever follows <eot> is never read
    torch.testing.assert_close(tower.hidden_states(other_padding), states)
    changed = rows.clone()
    changed[0, 3] = 9  # a later token changes an earlier one's state: not causal
    assert not torch.allclose(tower.hidden_states(changed)[0, 1], states[0, 1])


def test_masking_picks_fifteen_percent_of_the_words_in_bert_proportions_and_no_special_token():
    torch.manual_seed(1)
    tokens = _rows(*[10] * 4000)
    inputs, masked, labels = draw_masking(tokens, _config(), [PAD, SOT, EOT, 3], torch.Generator().manual_seed(0))
    picked = labels != IGNORE
    words = tokens >= 4
    assert not (picked & ~words).any() and not (masked & ~picked).any()
    assert picked.sum() / words.sum() == pytest.approx(0.15, abs=0.005)
    torch.testing.assert_close(labels[picked], tokens[picked])
    shown_as_mask = masked.sum() / picked.sum()
    randomized = (inputs != tokens).sum() / picked.sum()
    assert shown_as_mask == pytest.approx(0.8, abs=0.01)
    assert randomized == pytest.approx(0.1 * 35 / 36, abs=0.01)  # a random word can be the same word
    assert (inputs[~picked] == tokens[~picked]).all() and (inputs >= 4)[words].all()
    again = draw_masking(tokens, _config(), [PAD, SOT, EOT, 3], torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(again, (inputs, masked, labels)))


def test_the_loss_is_the_cross_entropy_at_the_picked_places_only():
    torch.manual_seed(2)
    model = MaskedLanguageModel(_config()).eval()
    tokens = _rows(6, 3, 8)
    inputs, masked, labels = draw_masking(tokens, _config(mask_ratio=0.5), [PAD, SOT, EOT],
                                          torch.Generator().manual_seed(1))
    losses = model(inputs, masked, labels)
    logits = model(inputs, masked)
    picked = labels != IGNORE
    expected = F.cross_entropy(logits[picked], labels[picked], reduction="none")
    torch.testing.assert_close(losses[picked], expected, atol=1e-5, rtol=1e-5)
    assert (losses[~picked] == 0).all()
    # the masked places see the mask embedding, not the word under it
    hidden_word = inputs.clone()
    hidden_word[masked] = 5
    torch.testing.assert_close(model(hidden_word, masked, labels), losses)


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="needs a bidirectional tower: text.causal=false"):
        MlmConfig(text=TextConfig(causal=True))
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        _config(mask_ratio=0.0)
    with pytest.raises(ValueError, match="text.eot_token_id must be set"):
        MaskedLanguageModel(MlmConfig(text=TextConfig(width=32, layers=1, heads=2, causal=False)))
    with pytest.raises(ValueError, match=r"inputs, masked and labels must have one shape"):
        MaskedLanguageModel(_config())(_rows(3), torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="task mlm reads its captions into memory"):
        train(mlm_config(tmp_path, "streamed", "--data.streaming=true", "--data.source=shards"), progress=False)


def test_batches_pick_the_same_places_after_a_resume(tmp_path):
    task = prepared_task(mlm_config(tmp_path, "batches"))
    first = [batch for batch, _ in zip(task.batches(1, 0), range(3))]
    resumed = next(task.batches(1, 2))
    for part, expected in zip(resumed, first[2]):
        torch.testing.assert_close(part, expected)
    assert not torch.equal(first[0][2], first[1][2])
    picked = (first[0][2] != IGNORE).sum()
    assert first[0][3].sum() * picked == pytest.approx(len(first[0][3]))  # rows' weights: 1 / picked tokens


@pytest.mark.distributed
def test_two_processes_follow_one_and_the_tower_carries_over(tmp_path):
    assert_ddp_follows_one_process(mlm_config, tmp_path)
    model, tokenizer = mmfast.load(str(tmp_path / "single"))
    assert model.features(tokenizer(["a red circle.", "two blue stars at the center."])).shape == (2, 32)
    saved = torch.load(tmp_path / "single" / "model.pt", weights_only=False)
    tower = {key: value for key, value in saved["state_dict"].items() if key.startswith("text_model.")}
    assert tower

    # a contrastive run with a bidirectional text tower starts from it (frozen here: the weights it saves are
    # the ones it started from); the same data, so the tokenizer it trains is the same
    overrides = [*TEXT, "--model.text.causal=false", "--model.embed_dim=16", "--model.vision.width=32",
                 "--model.vision.layers=1", "--model.vision.heads=2", "--data.train_samples=96",
                 "--data.held_out_samples=16", "--data.batch_size=16", "--train.steps=1", "--train.eval_every=1",
                 "--train.checkpoint_every=1", "--train.trainable=[vision_model,visual_projection]",
                 f"--data.synth_dir={tmp_path / 'synth'}", f"--train.init_from={tmp_path / 'single'}"]
    clip = load_config("clip-tiny", overrides)
    clip.run_dir = str(tmp_path / "clip")
    train(clip, progress=False)
    carried = torch.load(tmp_path / "clip" / "model.pt", weights_only=False)["state_dict"]
    for key, value in tower.items():
        torch.testing.assert_close(carried[key], value, msg=key)
    causal = load_config("clip-tiny", [*overrides, "--model.text.causal=true"])
    causal.run_dir = str(tmp_path / "causal")
    with pytest.raises(ValueError, match=r"text tower does not fit model.text: causal False \(the model's: True\)"):
        train(causal, progress=False)
    other = load_config("clip-tiny", [*overrides, "--model.text.vocab_size=50"])
    other.run_dir = str(tmp_path / "other")
    with pytest.raises(ValueError, match="trained with another tokenizer than this run's: set data.tokenizer"):
        train(other, progress=False)
