"""Scores of generated answers, as the field reports them: VQA accuracy with VQAv2's answer
normalization, POPE's yes/no hallucination metrics, and MMBench's CircularEval for multiple choice.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence

# VQAv2's evaluation (vqaEval.py): punctuation, number words, articles, contractions
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
                 "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
                 "isnt": "isn't", "its": "it's", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's",
                 "theyre": "they're", "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wont": "won't",
                 "wouldnt": "wouldn't", "youre": "you're"}


def normalize_answer(answer: str) -> str:
    """VQAv2's normalization: whitespace, punctuation (kept inside numbers like 1,000), periods not in
    numbers, lower case, number words to digits, articles dropped, contractions restored."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for mark in _PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or _COMMA_BETWEEN_DIGITS.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(word, word) for word in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2's accuracy of one prediction: with several human answers, min(#others matching / 3, 1)
    averaged over leaving each answer out (the official formula; min(#matching / 3, 1) for 10 answers
    up to that averaging); with one reference answer, 1 if they match after normalization, else 0."""
    if not answers:
        raise ValueError("vqa_accuracy: expected at least one reference answer, got none")
    predicted = normalize_answer(prediction)
    normalized = [normalize_answer(answer) for answer in answers]
    if len(normalized) == 1:
        return float(predicted == normalized[0])
    scores = []
    for left_out in range(len(normalized)):
        matching = sum(answer == predicted for index, answer in enumerate(normalized) if index != left_out)
        scores.append(min(1.0, matching / 3))
    return sum(scores) / len(scores)


def yes_or_no(answer: str) -> str:
    """POPE's reading of a free answer: "no" when its first sentence says no or not, else "yes"."""
    first = answer.strip().split(".")[0].lower().replace(",", " ")
    return "no" if {"no", "not"} & set(first.split()) else "yes"


def pope_metrics(predictions: Sequence[str], truths: Sequence[str]) -> dict:
    """Accuracy, precision, recall and F1 of "yes" (the object is there), and the share of yes answers,
    of free-text answers to existence questions (truths "yes"/"no")."""
    if len(predictions) != len(truths) or not truths:
        raise ValueError(f"pope_metrics: expected as many predictions as truths (at least one), got "
                         f"{len(predictions)} and {len(truths)}")
    said = [yes_or_no(answer) == "yes" for answer in predictions]
    true = [truth.strip().lower() == "yes" for truth in truths]
    hits = sum(s and t for s, t in zip(said, true))
    precision = hits / max(sum(said), 1)
    recall = hits / max(sum(true), 1)
    return {"accuracy": sum(s == t for s, t in zip(said, true)) / len(true), "precision": precision,
            "recall": recall, "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": sum(said) / len(said)}


def circular_eval(choose: Callable[[str, list[str]], int], question: str, options: Sequence[str],
                  answer: int) -> bool:
    """MMBench's CircularEval: right only if `choose(question, options)` (the index it picks) finds the
    answer under every rotation of the options."""
    if not 0 <= answer < len(options):
        raise ValueError(f"circular_eval: answer must index the {len(options)} options, got {answer}")
    for shift in range(len(options)):
        rotated = list(options[shift:]) + list(options[:shift])
        if choose(question, rotated) != (answer - shift) % len(options):
            return False
    return True


def chosen_option(answer: str, count: int, options: Sequence[str] | None = None) -> int | None:
    """The index of the option an answer picks, or None: its letter ("B", "B.", "(b) square"; a letter
    followed by a space is a word: "A red star" picks no letter), else, given the options, the one
    option whose text it names (MMBench's matching of the option's content)."""
    found = re.match(r"\s*\(?([A-Za-z])(?:[).:]|\s*$)", answer)
    if found:
        index = ord(found.group(1).upper()) - ord("A")
        return index if 0 <= index < count else None
    words = f" {normalize_answer(answer)} "
    named = [index for index, option in enumerate(options or ()) if f" {normalize_answer(option)} " in words]
    return named[0] if len(named) == 1 else None
