"""The bundled LLaVA data: deterministic, answers true to the pictures' metadata (multiple choice too),
yes/no balanced, the description last and the existence question first, readable by
mmfast.data.conversations."""
import json
import re
from collections import Counter

import numpy as np
from PIL import Image

from mmfast.data import synth
from mmfast.data.conversations import read_conversations
from mmfast.data.synth_conversations import (QUESTION_TYPES, choice_question, conversation, existence_reply,
                                             question, write_conversations)


def test_written_twice_the_same_and_read_back(tmp_path):
    first = write_conversations(str(tmp_path / "a"), train=30, held_out=10, progress=False)
    second = write_conversations(str(tmp_path / "b"), train=30, held_out=10, progress=False)
    for name in first:
        assert json.load(open(first[name])) == json.load(open(second[name]))
    a = np.asarray(Image.open(tmp_path / "a" / "images" / "train-0000007.png"))
    assert (a == np.asarray(Image.open(tmp_path / "b" / "images" / "train-0000007.png"))).all()
    conversations = read_conversations(first["train"], str(tmp_path / "a" / "images"))
    assert len(conversations) == 30 and all(c.image and c.turns[0][1].startswith("<image>") for c in conversations)
    captions = read_conversations(first["held_out-captions"], str(tmp_path / "a" / "images"))
    assert len(captions) == 10 and captions[0].turns[0] == ("user", "<image>")
    train_ids = {c.id for c in conversations}
    assert not train_ids & {c.id for c in captions}  # held-out pictures are other pictures


def test_answers_follow_the_metadata_and_existence_is_balanced():
    rng = np.random.default_rng(0)
    answers = Counter()
    for index in range(300):
        meta = synth.shape_sample(np.random.default_rng([5, index]), 32, "continuous").meta
        assert question("color", meta, rng)[1] == meta["color"]
        assert question("shape", meta, rng)[1] == meta["shape"]
        assert question("count", meta, rng)[1] == synth.COUNT_WORDS[meta["count"]]
        assert question("position", meta, rng)[1] == meta["position"]
        text, answer = question("exists", meta, rng)
        answers[answer] += 1
        named = f"{meta['color']} {meta['shape']} in"
        assert (answer == "yes") == (named in text)
        for attribute in ("shape", "color"):  # the right option is the picture's shape or color
            text, options, index = choice_question(attribute, meta[attribute], rng)
            lettered = dict(line.split(". ") for line in re.findall(r"[A-D]\. \w+", text))
            assert list(lettered.values()) == options and options[index] == meta[attribute], text
    assert 0.4 < answers["yes"] / 300 < 0.6
    assert set(QUESTION_TYPES) == {"color", "shape", "count", "position", "exists", "describe"}


def test_the_description_comes_last_and_existence_first():
    rng = np.random.default_rng(1)
    for index in range(200):
        sample = synth.shape_sample(np.random.default_rng([6, index]), 32, "continuous")
        kinds = [item["type"] for item in conversation("k", sample.meta, sample.caption, rng)["questions"]]
        assert "describe" not in kinds[:-1], kinds
        if "exists" in kinds:
            assert kinds[0] == "exists", kinds


def test_the_existence_set_opens_every_conversation_with_it_and_leaves_the_plain_set_as_drawn(tmp_path):
    paths = write_conversations(str(tmp_path), train=40, held_out=5, progress=False)
    plain, existence = json.load(open(paths["train"])), json.load(open(paths["train-existence"]))
    assert [s["id"] for s in existence] == [s["id"] for s in plain] and "held_out-existence" not in paths
    for sample in existence:  # the same pictures, every conversation opened by the existence question
        kinds = [item["type"] for item in sample["questions"]]
        assert kinds[0] == "exists" and kinds.count("exists") == 1 and 2 <= len(kinds) <= 4, kinds
        assert sample["conversations"][0]["value"].startswith("<image>\nIs there")
    answers = Counter(sample["questions"][0]["answer"] for sample in existence)
    assert answers["yes"] > 10 and answers["no"] > 10
    # the plain set is the picture stream's own draw (its file did not change when the existence set came)
    for index in (0, 17, 39):
        rng = np.random.default_rng([0, 2, index])
        picture = synth.shape_sample(rng, 32, "continuous")
        assert conversation(f"train-{index:07d}", picture.meta, picture.caption, rng) == plain[index]
    assert sum("exists" in [q["type"] for q in s["questions"]] for s in plain) < 35


def test_existence_replies_say_what_the_picture_shows_then_the_truth():
    """The reply names the picture's color and shape (never the question's), singular, then the answer POPE
    reads (its first sentence); in a conversation it is the existence turn's reply."""
    from mmfast.train.generative_metrics import yes_or_no

    rng = np.random.default_rng(2)
    seen = Counter()
    for index in range(200):
        sample = synth.shape_sample(np.random.default_rng([7, index]), 32, "continuous")
        meta = sample.meta
        text, answer = question("exists", meta, rng)
        reply = existence_reply(meta, answer)
        article = "an" if meta["color"][0] in "aeiou" else "a"
        subject = "Each is" if meta["count"] > 1 else "It is"
        assert reply == f"{subject} {article} {meta['color']} {meta['shape']}, so {answer}.", reply
        assert yes_or_no(reply) == answer
        asked = text.removeprefix("Is there ").removesuffix(" in the image?").split()[1:]
        assert (asked == [meta["color"], meta["shape"]]) == (answer == "yes"), (text, reply)
        seen[answer] += 1
        opened = conversation("k", meta, sample.caption, rng, existence_first=True)
        assert opened["conversations"][1]["value"] == existence_reply(meta, opened["questions"][0]["answer"])
    assert seen["yes"] > 50 and seen["no"] > 50
