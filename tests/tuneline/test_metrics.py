from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest

from tuneline.metrics import (
    answer_label,
    answers_are_labels,
    bootstrap_ci,
    exact_match,
    normalize_answer,
    normalized_match,
    paired_test,
    pairwise_judge_score,
    parse_judge_verdict,
    per_label_accuracy,
    score_answers,
    token_f1,
)

HOUSE = "Category: billing\nReply: We have refunded the duplicate charge."


def test_exact_match_ignores_only_surrounding_whitespace() -> None:
    assert exact_match(HOUSE + "\n", HOUSE) == 1.0
    assert exact_match(HOUSE.lower(), HOUSE) == 0.0


def test_normalized_match_ignores_case_punctuation_articles_and_spacing() -> None:
    assert normalize_answer("  The  Refund, is   DONE! ") == "refund is done"
    assert normalized_match("category: BILLING reply: we have refunded duplicate charge", HOUSE) == 1.0
    assert normalized_match("Category: shipping\nReply: We have refunded the duplicate charge.", HOUSE) == 0.0


def test_token_f1_counts_overlap_with_multiplicity() -> None:
    assert token_f1("paris", "Paris.") == 1.0
    # predicted: [paris, paris], expected: [paris, france] -> overlap 1, p = 1/2, r = 1/2
    assert token_f1("paris paris", "Paris, France") == pytest.approx(0.5)
    assert token_f1("london", "paris") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("", "paris") == 0.0


def test_score_answers_aligns_and_rejects_length_mismatch() -> None:
    scores = score_answers([HOUSE, "Category: billing\nReply: no"], [HOUSE, HOUSE])
    assert scores["exact_match"].tolist() == [1.0, 0.0]
    # 3 shared tokens (category, billing, reply) of 4 predicted and 8 expected ("the" is dropped)
    assert scores["token_f1"][1] == pytest.approx(2 * (3 / 4) * (3 / 8) / (3 / 4 + 3 / 8))
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        score_answers(["a", "b"], ["a"])


def test_labels_come_from_the_category_line() -> None:
    assert answer_label(HOUSE) == "billing"
    assert answer_label("category :  Technical Problem.\nReply: x") == "technical problem"
    assert answer_label("Category: billing/double_charge\nReply: x") == "billing/double_charge"
    assert answer_label("Paris") is None
    assert answers_are_labels([HOUSE, "Category: shipping\nReply: ok"])
    assert not answers_are_labels([HOUSE, "Paris"])
    assert not answers_are_labels([])


def test_per_label_accuracy_compares_labels_not_replies() -> None:
    references = [HOUSE, HOUSE, "Category: shipping\nReply: On its way.", "no label"]
    predictions = ["Category: Billing\nReply: something else", "Category: shipping\nReply: x", "", "whatever"]
    accuracy = per_label_accuracy(predictions, references)
    assert list(accuracy) == ["billing", "shipping"]
    assert (accuracy["billing"].support, accuracy["billing"].correct) == (2, 1)
    assert accuracy["billing"].accuracy == 0.5
    assert accuracy["shipping"].accuracy == 0.0


def test_bootstrap_ci_brackets_the_mean_and_is_deterministic() -> None:
    scores = np.array([1.0] * 30 + [0.0] * 70)
    estimate = bootstrap_ci(scores, samples=2000, seed=7)
    assert estimate.mean == pytest.approx(0.3)
    # Normal approximation of the mean's 95% interval: 0.3 +- 1.96 * sqrt(0.21 / 100) = +-0.09.
    assert estimate.low == pytest.approx(0.21, abs=0.03)
    assert estimate.high == pytest.approx(0.39, abs=0.03)
    assert bootstrap_ci(scores, samples=2000, seed=7) == estimate
    assert str(estimate).startswith("0.300 [")


def test_bootstrap_ci_of_constant_scores_and_of_nothing() -> None:
    constant = bootstrap_ci([1.0] * 12, samples=200)
    assert (constant.low, constant.mean, constant.high) == (1.0, 1.0, 1.0)
    empty = bootstrap_ci([], samples=200)
    assert empty.n == 0 and math.isnan(empty.mean)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0], confidence=1.0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=60), st.integers(0, 2**16))
def test_bootstrap_interval_always_contains_the_mean(values: list[float], seed: int) -> None:
    estimate = bootstrap_ci(values, samples=100, seed=seed)
    assert estimate.low - 1e-12 <= estimate.mean <= estimate.high + 1e-12
    assert min(values) - 1e-12 <= estimate.low and estimate.high <= max(values) + 1e-12


def test_mcnemar_exact_on_binary_scores_matches_the_binomial_tail() -> None:
    # 9 examples only the candidate gets right, 1 only the reference, 10 both.
    candidate = [1.0] * 9 + [0.0] + [1.0] * 10
    reference = [0.0] * 9 + [1.0] + [1.0] * 10
    result = paired_test(candidate, reference)
    assert result.method == "mcnemar_exact"
    assert (result.wins, result.losses, result.ties, result.n) == (9, 1, 10, 20)
    assert result.delta == pytest.approx(8 / 20)
    assert result.p_value == pytest.approx(binomtest(9, 10, 0.5, alternative="greater").pvalue)
    assert result.p_value == pytest.approx(11 / 1024)


def test_paired_test_is_one_sided_and_identical_models_never_pass() -> None:
    same = [1.0, 0.0, 1.0, 1.0]
    assert paired_test(same, same).p_value == 1.0
    worse = paired_test([0.0] * 10, [1.0] * 10)
    assert worse.delta == -1.0 and worse.p_value == 1.0


def test_paired_bootstrap_on_continuous_scores() -> None:
    rng = np.random.default_rng(3)
    reference = rng.uniform(0.2, 0.6, size=80)
    better = paired_test(reference + 0.2, reference, samples=500, seed=1)
    assert better.method == "paired_bootstrap"
    assert better.delta == pytest.approx(0.2)
    assert better.p_value == pytest.approx(1 / 501)
    noise = rng.normal(0, 0.05, size=80)
    tie = paired_test(reference + noise - noise.mean(), reference, samples=500, seed=1)
    assert tie.p_value > 0.2
    with pytest.raises(ValueError, match="differ in length"):
        paired_test([0.5], [0.5, 0.5])


def test_judge_verdicts_and_position_bias_cancels() -> None:
    assert parse_judge_verdict(" a.") == "first"
    assert parse_judge_verdict("B\nbecause it is shorter") == "second"
    assert parse_judge_verdict("Answer A is better") == "tie"
    assert parse_judge_verdict("") == "tie"
    # Candidate shown first, then second: consistent preference wins, position-only preference ties.
    assert pairwise_judge_score("first", "second") == 1.0
    assert pairwise_judge_score("second", "first") == 0.0
    assert pairwise_judge_score("first", "first") == 0.5
    assert pairwise_judge_score("first", "tie") == 0.75


def test_wilson_interval_matches_the_formula() -> None:
    from tuneline.metrics import wilson_interval

    estimate = wilson_interval(8, 10, 0.95)
    z = 1.959963984540054
    p, n = 0.8, 10
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert estimate.mean == 0.8 and estimate.n == 10
    assert abs(estimate.low - (centre - half)) < 1e-9 and abs(estimate.high - (centre + half)) < 1e-9
    assert wilson_interval(0, 5).low == 0.0 and wilson_interval(5, 5).high == 1.0
    assert math.isnan(wilson_interval(0, 0).mean)
