"""Scores of generated answers against hand-worked cases of the official formulas."""
import pytest

from mmfast.data.conversations import option_letters
from mmfast.train.generative_metrics import (chosen_option, circular_eval, normalize_answer,
                                             pope_metrics, vqa_accuracy, yes_or_no)


@pytest.mark.parametrize("raw,expected", [
    ("Two", "2"), ("The red circle.", "red circle"), ("  a Dog!\n", "dog"), ("1,000", "1000"),
    ("yes, it is", "yes it is"), ("3.5", "3.5"), ("dont know", "don't know"), ("top-left", "top left"),
    ("none", "0"), ("an apple", "apple"),
])
def test_vqa_normalization(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_accuracy_official_formula():
    # ten human answers: "2" four times. Leaving out a "2": 3 others match -> 1; leaving out another: 4 -> 1
    answers = ["2"] * 4 + ["3"] * 6
    assert vqa_accuracy("two", answers) == pytest.approx(1.0)
    # "2" twice: leaving out a "2" -> 1 match (1/3), leaving out one of 8 others -> 2 matches (2/3)
    answers = ["2"] * 2 + ["3"] * 8
    assert vqa_accuracy("2", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("4", answers) == 0.0
    assert vqa_accuracy("Red.", ["red"]) == 1.0 and vqa_accuracy("blue", ["red"]) == 0.0
    with pytest.raises(ValueError, match="at least one reference answer"):
        vqa_accuracy("red", [])


def test_pope_metrics_and_reading_yes_or_no():
    assert yes_or_no("No, there is not.") == "no" and yes_or_no("Yes.") == "yes"
    assert yes_or_no("There is not a red star.") == "no" and yes_or_no("There is a star. Not blue.") == "yes"
    scores = pope_metrics(["yes", "Yes.", "no", "No.", "yes"], ["yes", "no", "no", "yes", "yes"])
    # said yes 3 (2 right), truths yes 3: precision 2/3, recall 2/3
    assert scores["accuracy"] == pytest.approx(3 / 5) and scores["yes_ratio"] == pytest.approx(3 / 5)
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="as many predictions as truths"):
        pope_metrics(["yes"], [])


def test_circular_eval_needs_every_rotation():
    options = ["circle", "square", "star"]
    always_circle = lambda question, shown: shown.index("circle")  # noqa: E731
    always_first = lambda question, shown: 0  # noqa: E731
    assert circular_eval(always_circle, "Which shape is red?", options, 0)
    assert not circular_eval(always_first, "Which shape is red?", options, 0)  # right only unrotated
    assert option_letters(options) == "A. circle B. square C. star"
    assert [chosen_option(text, 3) for text in ("B", "B. square", "(c) star", "circle", "D.")] == [1, 1, 2, None, None]
    # with the options: an answer that names one of them picks it ("A red star" is not the letter A)
    options = ["circle", "star", "square"]
    assert [chosen_option(text, 3, options) for text in ("A red star.", "circle", "a star or a circle", "cross")] == \
        [1, 0, None, None]
    with pytest.raises(ValueError, match="answer must index"):
        circular_eval(always_first, "q", options, 3)
