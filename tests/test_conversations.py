"""mmfast.data.conversations: LLaVA's JSON, templates, labels from role spans, packing, bad input."""
import json

import pytest


from mmfast.data.conversations import IGNORE, encode, pack, read_conversations, render

tokenizers = pytest.importorskip("tokenizers")

SAMPLES = [
    {"id": "a", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Is there a green circle?"}, {"from": "gpt", "value": "No."}]},
    {"id": "b", "conversations": [{"from": "human", "value": "Name a shape."}, {"from": "gpt", "value": "A star."}]},
]


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    built = Tokenizer(models.BPE(unk_token="<unk>"))
    built.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    built.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>", "</s>", "<image>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    built.train_from_iterator(["What color is the shape? Red. Is there a green circle? No. Name a shape. A star.",
                               "A chat between a curious user and an assistant. USER: ASSISTANT:"], trainer)
    return built


def supervised_text(encoded, tokenizer):
    """The text of the tokens some position predicts (labels are shifted by one)."""
    targets = encoded.labels[encoded.labels != IGNORE]
    return tokenizer.decode(targets.tolist(), skip_special_tokens=False)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"png")
    (tmp_path / "data.json").write_text(json.dumps(SAMPLES))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(sample) for sample in SAMPLES))
    return tmp_path


def test_json_and_jsonl_read_the_same(files):
    from_json = read_conversations(str(files / "data.json"), str(files / "images"))
    assert from_json == read_conversations(str(files / "data.jsonl"), str(files / "images"))
    assert from_json[0].image == str(files / "images" / "a.png") and from_json[1].image is None
    assert from_json[0].turns[1] == ("assistant", "Red.")


def test_vicuna_labels_supervise_the_answers_and_their_end_tokens_only(files):
    tok = tokenizer()
    first, second = read_conversations(str(files / "data.json"), str(files / "images"))
    encoded = encode(first, "vicuna_v1", tok, eos="</s>", image_token_id=999, image_tokens=5)
    assert supervised_text(encoded, tok) == " Red.</s> No.</s>"
    image = (encoded.input_ids == 999).nonzero().flatten()
    assert image.tolist() == list(range(int(image[0]), int(image[0]) + 5))  # one run of 5 image tokens
    assert (encoded.labels[image] == IGNORE).all() and (encoded.labels[image[0] - 1] == IGNORE)
    text_only = encode(second, "vicuna_v1", tok, eos="</s>", image_token_id=999, image_tokens=5)
    assert supervised_text(text_only, tok) == " A star.</s>" and 999 not in text_only.input_ids.tolist()
    assert encoded.labels[-1] == IGNORE  # nothing beyond the conversation is predicted


def test_plain_template_is_the_image_then_the_caption(files):
    tok = tokenizer()
    first = read_conversations(str(files / "data.json"), str(files / "images"))[0]
    text, spans = render(first, "plain", "</s>")
    assert text == "<image>Red.</s>" and spans == [(7, 15)]
    encoded = encode(first, "plain", tok, eos="</s>", image_token_id=999, image_tokens=3)
    assert encoded.input_ids[:3].tolist() == [999] * 3
    assert supervised_text(encoded, tok) == "Red.</s>"


def test_the_tokenizers_own_chat_template(files):
    transformers = pytest.importorskip("transformers")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer(), eos_token="</s>")
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    first = read_conversations(str(files / "data.json"), str(files / "images"))[0]
    encoded = encode(first, "chat", tok, eos="</s>", image_token_id=999, image_tokens=2)
    assert tok.decode(encoded.labels[encoded.labels != IGNORE].tolist()) == "Red.</s>No.</s>"


def test_packing_fills_rows_and_keeps_each_conversation_whole(files):
    tok = tokenizer()
    conversations = read_conversations(str(files / "data.json"), str(files / "images")) * 3
    encoded = [encode(c, "vicuna_v1", tok, eos="</s>", image_token_id=999, image_tokens=4) for c in conversations]
    capacity = max(len(e.input_ids) for e in encoded) * 2
    batches = pack(encoded, capacity)
    assert sum(len(b.input_ids) for b in batches) == sum(len(e.input_ids) for e in encoded)
    for batch in batches:
        assert len(batch.input_ids) <= capacity and batch.cu_seqlens[-1] == len(batch.input_ids)
        assert len(batch.images) * 4 == int((batch.input_ids == 999).sum())
        ends = batch.cu_seqlens[1:].long() - 1
        assert (batch.labels[ends] == IGNORE).all()  # no target across conversations
    with pytest.raises(ValueError, match="exceeds the row capacity"):
        pack(encoded, 5)


def test_bad_input_names_file_and_line(files):
    bad = files / "bad.jsonl"
    bad.write_text(json.dumps(SAMPLES[1]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: malformed JSON"):
        read_conversations(str(bad))
    with pytest.raises(FileNotFoundError, match="no image folder"):
        read_conversations(str(files / "data.json"), str(files / "nowhere"))
    (files / "images" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"entry 0: image .*a.png does not exist"):
        read_conversations(str(files / "data.json"), str(files / "images"))
    role = files / "role.json"
    role.write_text(json.dumps([{"conversations": [{"from": "bot", "value": "hi"}]}]))
    with pytest.raises(ValueError, match="entry 0: turn 0 must have 'from'"):
        read_conversations(str(role))
    orphan = files / "orphan.json"
    orphan.write_text(json.dumps([{"conversations": [{"from": "human", "value": "<image> hi"}]}]))
    with pytest.raises(ValueError, match="without an 'image'"):
        read_conversations(str(orphan))
    with pytest.raises(ValueError, match="template must be one of"):
        render(read_conversations(str(files / "data.jsonl"))[1], "alpaca", "</s>")
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        render(read_conversations(str(files / "data.jsonl"))[1], "chat", "</s>")
