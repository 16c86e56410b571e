"""Answer-quality metrics and the statistics the promotion gate stands on (pure functions, no I/O).

Per-example scores are floats in [0, 1] so that every metric is a mean and shares one bootstrap.
Exact match compares the stripped texts; normalised match and token F1 compare the SQuAD-style
normal form (case, punctuation, articles and whitespace ignored). A support answer is a label when it
has a `Category: <label>` line; per-label accuracy compares those labels.

The paired test is one-sided (is the candidate better than the reference on the same examples?):
- McNemar's exact test when both score vectors are 0/1 (exact and normalised match): under the null
  hypothesis a discordant pair is equally likely to favour either model, so the p-value is
  P(X >= wins) for X ~ Binomial(wins + losses, 1/2).
- A paired bootstrap otherwise (token F1, judge scores): the share of resampled mean differences
  that are <= 0, with the +1 correction so that p is never exactly 0.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.stats import binomtest

MetricName = Literal["exact_match", "normalized_match", "token_f1"]
METRICS: tuple[MetricName, ...] = ("exact_match", "normalized_match", "token_f1")

LABEL_LINE = re.compile(r"^\s*category\s*:\s*(?P<label>.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation + "“”‘’«»…–—")
_BOOTSTRAP_CHUNK = 256  # resamples drawn at once: bounds memory to chunk x n indices


def normalize_answer(text: str) -> str:
    """The comparison form: NFKC, case-folded, punctuation and articles removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def normalized_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over normalised tokens (two empty answers agree)."""
    predicted = normalize_answer(prediction).split()
    expected = normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted)
    recall = overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


SCORERS: dict[MetricName, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "normalized_match": normalized_match,
    "token_f1": token_f1,
}


def score_answers(predictions: Sequence[str], references: Sequence[str]) -> dict[MetricName, np.ndarray]:
    """Per-example scores for every metric, aligned with the inputs."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return {
        name: np.fromiter((score(p, r) for p, r in zip(predictions, references, strict=True)), float)
        for name, score in SCORERS.items()
    }


def answer_label(text: str) -> str | None:
    """The label of a `Category: <label>` answer (case-folded, spaces collapsed, surrounding punctuation
    removed, so `billing/double_charge` stays itself), None when the answer has none."""
    match = LABEL_LINE.search(text)
    if not match:
        return None
    return " ".join(match.group("label").casefold().split()).strip(string.punctuation + " ") or None


def answers_are_labels(references: Sequence[str]) -> bool:
    """True when every reference answer carries a label, so per-label accuracy is meaningful."""
    return bool(references) and all(answer_label(r) is not None for r in references)


@dataclass(frozen=True, slots=True)
class LabelAccuracy:
    label: str
    support: int  # reference answers with this label
    correct: int  # of those, predictions with the same label

    @property
    def accuracy(self) -> float:
        return self.correct / self.support if self.support else math.nan


def per_label_accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict[str, LabelAccuracy]:
    """For each reference label: how often the prediction names the same label (sorted by label)."""
    support: Counter[str] = Counter()
    correct: Counter[str] = Counter()
    for prediction, reference in zip(predictions, references, strict=True):
        label = answer_label(reference)
        if label is None:
            continue
        support[label] += 1
        correct[label] += answer_label(prediction) == label
    return {label: LabelAccuracy(label, support[label], correct[label]) for label in sorted(support)}


@dataclass(frozen=True, slots=True)
class Estimate:
    """A mean with its percentile-bootstrap confidence interval (nan for an empty sample)."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _resampled_means(values: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    n = len(values)
    means = np.empty(samples)
    for start in range(0, samples, _BOOTSTRAP_CHUNK):
        stop = min(start + _BOOTSTRAP_CHUNK, samples)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


def bootstrap_ci(
    scores: Sequence[float] | np.ndarray, samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Estimate:
    """The mean of `scores` with a percentile bootstrap interval; deterministic for a given seed."""
    values = np.asarray(scores, dtype=float)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if len(values) == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, confidence)
    means = _resampled_means(values, samples, np.random.default_rng(seed))
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Estimate(float(values.mean()), float(low), float(high), len(values), confidence)


@dataclass(frozen=True, slots=True)
class PairedTest:
    """Candidate minus reference on the same examples, with a one-sided p-value (candidate better)."""

    method: Literal["mcnemar_exact", "paired_bootstrap"]
    delta: float  # mean(candidate) - mean(reference)
    p_value: float
    n: int
    wins: int  # examples where the candidate scored higher
    losses: int  # examples where the reference scored higher

    @property
    def ties(self) -> int:
        return self.n - self.wins - self.losses


def paired_test(
    candidate: Sequence[float] | np.ndarray,
    reference: Sequence[float] | np.ndarray,
    samples: int = 1000,
    seed: int = 0,
) -> PairedTest:
    """One-sided paired test that the candidate beats the reference (see the module docstring)."""
    a = np.asarray(candidate, dtype=float)
    b = np.asarray(reference, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores differ in length: {len(a)} candidate vs {len(b)} reference")
    n = len(a)
    wins, losses = int((a > b).sum()), int((a < b).sum())
    delta = float((a - b).mean()) if n else 0.0
    binary = bool(np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all())
    if binary:
        discordant = wins + losses
        p = binomtest(wins, discordant, 0.5, alternative="greater").pvalue if discordant else 1.0
        return PairedTest("mcnemar_exact", delta, float(p), n, wins, losses)
    if n == 0 or wins + losses == 0:
        return PairedTest("paired_bootstrap", delta, 1.0, n, wins, losses)
    means = _resampled_means(a - b, samples, np.random.default_rng(seed))
    p = (int((means <= 0).sum()) + 1) / (samples + 1)
    return PairedTest("paired_bootstrap", delta, p, n, wins, losses)


JudgeVerdict = Literal["first", "second", "tie"]


def parse_judge_verdict(text: str) -> JudgeVerdict:
    """The judge's pick from the first word of its reply: `A` = first answer, `B` = second.

    The judge is asked to answer with one word; anything else (TIE, prose, nothing) counts as a tie
    rather than guessing, so an unreliable judge pulls scores towards 0.5, never towards one side.
    """
    words = text.strip().upper().split()
    first_word = words[0].strip(string.punctuation) if words else ""
    return "first" if first_word == "A" else "second" if first_word == "B" else "tie"


def pairwise_judge_score(candidate_first: JudgeVerdict, candidate_second: JudgeVerdict) -> float:
    """The candidate's score for one example judged twice with the order swapped.

    In the first pass the candidate's answer is shown first, in the second pass second; the score is
    the mean of the two passes (win 1, tie 0.5, loss 0). A judge that always picks the same position
    gives 0.5 whoever answered better, so position bias cancels instead of deciding.
    """
    first_pass = {"first": 1.0, "second": 0.0, "tie": 0.5}[candidate_first]
    second_pass = {"first": 0.0, "second": 1.0, "tie": 0.5}[candidate_second]
    return (first_pass + second_pass) / 2


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Estimate:
    """A proportion with its Wilson score interval (scipy's `binomtest(...).proportion_ci`): unlike
    the bootstrap, right for a 0/1 outcome on few examples and near 0 or 1 (nan for n = 0)."""
    if n <= 0:
        return Estimate(math.nan, math.nan, math.nan, 0, confidence)
    interval = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return Estimate(successes / n, float(interval.low), float(interval.high), n, confidence)
