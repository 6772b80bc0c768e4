"""mmfast.train.caption_metrics: BLEU-1..4 and CIDEr-D equal COCO's scorers (pycocoevalcap) on captions
of the bundled vocabulary and on hand cases; bad input is named."""
import random

import pytest

from mmfast.train.caption_metrics import bleu, cider_d, words

WORDS = ["a", "one", "two", "three", "small", "large", "red", "green", "blue", "circle", "circles", "star",
         "stars", "at", "the", "top", "left", "right", "center", "bottom"]


def _captions(seed: int, count: int):
    rng = random.Random(seed)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9)))  # noqa: E731
    candidates = [sentence() for _ in range(count)]
    references = [[sentence() for _ in range(rng.randint(1, 4))] for _ in range(count)]
    # some candidates close to a reference, so every n-gram order has matches
    for index in range(0, count, 3):
        candidates[index] = references[index][0] + rng.choice(["", " red", " at the top"])
    return candidates, references


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_equal_coco_scorers(seed):
    coco_bleu = pytest.importorskip("pycocoevalcap.bleu.bleu")
    coco_cider = pytest.importorskip("pycocoevalcap.cider.cider")
    candidates, references = _captions(seed, 40)
    keys = [str(index) for index in range(len(candidates))]
    results = {key: [candidate] for key, candidate in zip(keys, candidates)}
    truths = {key: list(refs) for key, refs in zip(keys, references)}
    expected_bleu, _ = coco_bleu.Bleu(4).compute_score(truths, results, verbose=0)
    assert bleu(candidates, references) == pytest.approx(expected_bleu, rel=1e-9, abs=1e-12)
    expected_cider, _ = coco_cider.Cider().compute_score(truths, results)
    assert cider_d(candidates, references) == pytest.approx(float(expected_cider), rel=1e-9)


def test_hand_cases():
    assert bleu(["a red circle at the top left"], [["a red circle at the top left"]])[3] == pytest.approx(1.0)
    # no 4-gram in common: BLEU-4 is (almost) zero, BLEU-1 is not
    scores = bleu(["red circle top left"], [["a red circle at the top left"]])
    assert scores[3] < 1e-3 and scores[0] > 0.3
    # too short: the brevity penalty exp(1 - 6 / 3)
    assert bleu(["red circle top"], [["red circle top left bottom right"]])[0] == pytest.approx(0.3679, abs=1e-4)
    assert words("A red circle, at the top-left.") == ["a", "red", "circle", "at", "the", "top", "left"]
    # CIDEr-D rewards the n-grams that tell captions apart: the same words everywhere score 0
    assert cider_d(["a red circle", "a red circle"], [["a red circle"], ["a red circle"]]) == 0.0
    assert cider_d(["a red circle", "a blue star"], [["a red circle"], ["a blue star"]]) > 5


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="one list of references per candidate"):
        bleu(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="at least one reference"):
        cider_d(["a"], [[]])
