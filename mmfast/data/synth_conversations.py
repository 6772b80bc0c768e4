"""Bundled LLaVA data from the shapes generator (mmfast.data.synth): stage-1 captions and stage-2
multi-turn conversations about the same pictures (color, shape, count, position, yes/no existence with
half the answers no, each answer saying first what the picture shows, a description) in LLaVA's JSON
format with an image folder, and multiple-choice questions for evaluation; train and held-out splits of
different pictures. Every question keeps its type and answer beside the conversation (`"questions"`),
which the evaluation scores per type.
"""
from __future__ import annotations

import json
import os

import numpy as np
from tqdm.auto import tqdm

from mmfast.data import synth
from mmfast.data.conversations import option_letters

QUESTION_TYPES = ("color", "shape", "count", "position", "exists", "describe")


def choice_question(attribute: str, truth: str, rng: np.random.Generator) -> tuple[str, list[str], int]:
    """A multiple-choice question (MMBench's form, for evaluation) about the picture's shape or color: its
    text, the four options (the truth and three others, in random order) and the right option's index.
    Not among the training questions: taught alongside the open ones, letter answers cost the tiny
    recipe's model its shape answers (0.73 -> 0.37 held-out, one run each)."""
    pool = synth.SHAPES if attribute == "shape" else tuple(synth.COLORS)
    options = [str(option) for option in rng.choice([p for p in pool if p != truth], size=3, replace=False)]
    options.insert(int(rng.integers(4)), truth)
    return choice_text(attribute, options), options, options.index(truth)


def choice_text(attribute: str, options: list[str]) -> str:
    """The open question with the options after it: a model answers by letter or by naming one."""
    stem = "Which shape is in the image?" if attribute == "shape" else "Which color does the shape have?"
    return f"{stem}\n{option_letters(options)}"


def question(kind: str, meta: dict, rng: np.random.Generator) -> tuple[str, str]:
    """(question, answer) of one type about a shape picture's metadata."""
    count, shape, color = meta["count"], meta["shape"], meta["color"]
    several = count > 1
    if kind == "color":
        return rng.choice(["What color is the shape?", "Which color does the shape have?"]) if not several else \
            rng.choice(["What color are the shapes?", "Which color do the shapes have?"]), color
    if kind == "shape":
        return rng.choice(["What shape is shown?", "Which shape is in the image?"]), shape
    if kind == "count":
        return rng.choice(["How many shapes are there?", "How many shapes do you see?"]), synth.COUNT_WORDS[count]
    if kind == "position":
        return rng.choice(["Where is the shape?", "Where in the image is it?"]) if not several else \
            rng.choice(["Where are the shapes?", "Where in the image are they?"]), meta["position"]
    if kind == "exists":
        asked_color, asked_shape = color, shape
        if rng.random() < 0.5:  # half the answers are no: change the color, the shape or both
            while (asked_color, asked_shape) == (color, shape):
                change = rng.integers(3)
                asked_color = rng.choice(list(synth.COLORS)) if change != 1 else color
                asked_shape = rng.choice(synth.SHAPES) if change != 0 else shape
        article = "an" if asked_color[0] in "aeiou" else "a"
        answer = "yes" if (asked_color, asked_shape) == (color, shape) else "no"
        return f"Is there {article} {asked_color} {asked_shape} in the image?", answer
    if kind == "describe":
        words = ("a" if not several else synth.COUNT_WORDS[count], meta["size"], color, synth._plural(shape, count))
        return rng.choice(["Describe the image.", "What do you see?"]), \
            f"{' '.join(words)} at the {meta['position']}"
    raise ValueError(f"question: kind must be one of {QUESTION_TYPES}, got {kind!r}")


def existence_reply(meta: dict, answer: str) -> str:
    """The answer to an existence question: what the picture shows, then yes or no ("It is a red circle,
    so no."). Said first, the color and shape make the decision a comparison of two phrases of the text,
    which the tiny language model learns; a bare "Yes."/"No." asks it to compare the question's words
    with the picture inside one token, and it compared the shape only (POPE F1 0.757: asked about a blue
    circle beside a red one it said yes). The shape stays singular, the question's word for it."""
    article = "an" if meta["color"][0] in "aeiou" else "a"
    subject = "Each is" if meta["count"] > 1 else "It is"
    return f"{subject} {article} {meta['color']} {meta['shape']}, so {answer}."


def conversation(key: str, meta: dict, caption: str, rng: np.random.Generator, turns: tuple[int, int] = (2, 4),
                 existence_first: bool = False):
    """One picture's sample: the stage-2 conversation (its first question carries the image), the stage-1
    caption, and each question's type and answer. existence_first: the existence question opens every
    conversation (the training set llava-tiny's first tune stage reads, see write_conversations)."""
    size = int(rng.integers(turns[0], turns[1] + 1))
    if existence_first:
        others = [kind for kind in QUESTION_TYPES if kind != "exists"]
        kinds = ["exists", *rng.choice(others, size=size - 1, replace=False)]
    else:
        kinds = list(rng.choice(QUESTION_TYPES, size=size, replace=False))
    # an earlier answer must not give a later one away, or the model learns to copy it instead of looking
    # (and then fails the question asked alone, as evaluation asks it): the description, which names
    # everything, comes last; the existence question comes first (its answer names the color and shape a
    # later question asks, which a model can copy: measured, the color and shape asked alone held)
    kinds.sort(key=lambda kind: {"exists": -1, "describe": 1}.get(str(kind), 0))
    turns_out, questions = [], []
    for index, kind in enumerate(kinds):
        text, answer = question(str(kind), meta, rng)
        reply = existence_reply(meta, answer) if kind == "exists" else answer[0].upper() + answer[1:] + "."
        turns_out += [{"from": "human", "value": ("<image>\n" if index == 0 else "") + text},
                      {"from": "gpt", "value": reply}]
        questions.append({"type": str(kind), "question": text, "answer": answer})
    return {"id": key, "image": f"{key}.png", "conversations": turns_out, "caption": caption,
            "questions": questions, "meta": meta}


def write_conversations(out_dir: str, *, train: int = 4000, held_out: int = 400, size: int = 32, seed: int = 0,
                        geometry: str = "continuous", progress: bool = True) -> dict:
    """Writes `<out_dir>/images/*.png`, `<out_dir>/{train,held_out}.json` (stage 2: LLaVA's format),
    `<out_dir>/{train,held_out}-captions.json` (stage 1: one turn, the caption) and
    `<out_dir>/train-existence.json`: the same training pictures, each conversation opened by the existence
    question, so every conversation holds a comparison of the question's words with the answer's
    (llava-tiny's `text` stage learns it there, without the pictures). Returns the paths."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    paths = {}
    for split, count in (("train", train), ("held_out", held_out)):
        samples, captions, existence = [], [], []
        for index in tqdm(range(count), desc=f"conversations {split}", disable=not progress):
            # the shapes generator's own seeding, offset so these pictures are not the CLIP run's
            rng = np.random.default_rng([seed, 2 if split == "train" else 3, index])
            picture = synth.shape_sample(rng, size, geometry)
            key = f"{split}-{index:07d}"
            picture.image.save(os.path.join(out_dir, "images", f"{key}.png"))
            sample = conversation(key, picture.meta, picture.caption, rng)
            samples.append(sample)
            if split == "train":  # its own random stream: train.json stays what it was before this file
                existence.append(conversation(key, picture.meta, picture.caption,
                                              np.random.default_rng([seed, 4, index]), existence_first=True))
            captions.append({"id": key, "image": sample["image"], "conversations": [
                {"from": "human", "value": "<image>"}, {"from": "gpt", "value": picture.caption}]})
        files = [(split, samples), (f"{split}-captions", captions)] + ([("train-existence", existence)] if existence else [])
        for name, content in files:
            paths[name] = os.path.join(out_dir, f"{name}.json")
            with open(paths[name], "w") as handle:
                json.dump(content, handle)
    return paths
