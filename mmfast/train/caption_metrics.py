"""Caption scores as COCO's evaluation (pycocoevalcap) computes them: corpus BLEU-1..4 and CIDEr-D,
on captions split into words by `words` (lower case, punctuation dropped: what COCO's PTB tokenizer
does to plain captions, without its Java)."""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_PUNCTUATION = re.compile(r"[^\w\s']")
TINY, SMALL = 1e-15, 1e-9  # COCO's BLEU keeps zero counts from zeroing the product with these
CIDER_SIGMA = 6.0  # the Gaussian length penalty's width, in words


def words(caption: str) -> list[str]:
    return _PUNCTUATION.sub(" ", caption.lower()).split()


def ngrams(tokens: list[str], most: int = 4) -> Counter:
    """Counts of every n-gram of 1 to `most` words."""
    return Counter(tuple(tokens[start:start + n]) for n in range(1, most + 1)
                   for start in range(len(tokens) - n + 1))


def _check(candidates: Sequence[str], references: Sequence[Sequence[str]], name: str) -> None:
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"{name}: expected one list of references per candidate (and at least one), got "
                         f"{len(candidates)} candidates and {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError(f"{name}: every candidate needs at least one reference")


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], most: int = 4) -> list[float]:
    """Corpus BLEU-1 .. BLEU-`most` (COCO's: clipped n-gram counts summed over the corpus, the brevity
    penalty from the summed lengths with each candidate's closest reference length)."""
    _check(candidates, references, "bleu")
    correct, guessed = [0] * most, [0] * most
    candidate_length = reference_length = 0
    for candidate, refs in zip(candidates, references):
        tokens, ref_tokens = words(candidate), [words(ref) for ref in refs]
        counts = ngrams(tokens, most)
        clip = Counter()
        for ref in ref_tokens:
            clip |= ngrams(ref, most)  # the most times each n-gram occurs in one reference
        for gram, count in counts.items():
            correct[len(gram) - 1] += min(count, clip[gram])
        for n in range(most):
            guessed[n] += max(len(tokens) - n, 0)
        candidate_length += len(tokens)
        # the closest reference length, the shorter one on a tie
        reference_length += min((abs(len(ref) - len(tokens)), len(ref)) for ref in ref_tokens)[1]
    scores, product = [], 1.0
    for n in range(most):
        product *= (correct[n] + TINY) / (guessed[n] + SMALL)
        scores.append(product ** (1.0 / (n + 1)))
    ratio = (candidate_length + TINY) / (reference_length + SMALL)
    if ratio < 1:
        scores = [score * math.exp(1 - 1 / ratio) for score in scores]
    return scores


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], most: int = 4) -> float:
    """COCO's CIDEr (the -D variant: clipped candidate weights and a Gaussian length penalty), x10,
    averaged over candidates. The n-grams' document frequencies come from these references, as COCO
    computes them over the evaluated split."""
    _check(candidates, references, "cider_d")
    reference_counts = [[ngrams(words(ref), most) for ref in refs] for refs in references]
    frequency = Counter(gram for counts in reference_counts for gram in set().union(*counts))
    log_documents = math.log(float(len(references)))

    def vector(counts: Counter):
        """tf-idf weights per n, their norms, and the length COCO uses (the number of bigrams)."""
        weights = [dict() for _ in range(most)]
        for gram, count in counts.items():
            weights[len(gram) - 1][gram] = count * (log_documents - math.log(max(1.0, frequency[gram])))
        norms = [math.sqrt(sum(value * value for value in weight.values())) for weight in weights]
        return weights, norms, sum(count for gram, count in counts.items() if len(gram) == 2)

    total = 0.0
    for candidate, counts_of_refs in zip(candidates, reference_counts):
        weights, norms, length = vector(ngrams(words(candidate), most))
        score = [0.0] * most
        for ref_counts in counts_of_refs:
            ref_weights, ref_norms, ref_length = vector(ref_counts)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * CIDER_SIGMA ** 2))
            for n in range(most):
                dot = sum(min(value, ref_weights[n].get(gram, 0.0)) * ref_weights[n].get(gram, 0.0)
                          for gram, value in weights[n].items())
                if norms[n] and ref_norms[n]:
                    dot /= norms[n] * ref_norms[n]
                score[n] += dot * penalty
        total += sum(score) / most / len(counts_of_refs) * 10.0
    return total / len(candidates)
