from __future__ import annotations

import json

from tuneline.config import PromotionConfig
from tuneline.gate import GateEvidence, decide
from tuneline.metrics import paired_test

GATE = PromotionConfig(min_delta=0.02, alpha=0.05, max_canary_drop=0.1)


def evidence(
    candidate: list[float],
    reference: list[float],
    candidate_canary: float = 0.8,
    base_canary: float = 0.8,
    few_shot: float | None = None,
    unanswered: dict[str, int] | None = None,
) -> GateEvidence:
    return GateEvidence(
        primary_metric="exact_match",
        reference="champion",
        reference_model="ft:tuneline-tiny:local:support:aaaa1111",
        candidate_task=sum(candidate) / len(candidate),
        reference_task=sum(reference) / len(reference),
        paired=paired_test(candidate, reference),
        candidate_canary=candidate_canary,
        base_canary=base_canary,
        few_shot_task=few_shot,
        unanswered=unanswered or {},
    )


def rule(decision, name):  # type: ignore[no-untyped-def]
    return next(r for r in decision.rules if r.rule == name)


CLEARLY_BETTER = ([1.0] * 18 + [0.0] * 2, [1.0] * 8 + [0.0] * 12)


def test_clearly_better_candidate_passes_every_rule() -> None:
    decision = decide(evidence(*CLEARLY_BETTER, few_shot=0.3), GATE)
    assert decision.promoted
    assert [r.rule for r in decision.rules] == ["answered", "min_delta", "significant", "canary", "few_shot"]
    assert all(r.passed for r in decision.rules)
    assert rule(decision, "min_delta").observed == 0.5
    assert decision.summary().startswith("PROMOTED against the champion")


def test_a_tie_fails_both_delta_and_significance() -> None:
    same = [1.0] * 10 + [0.0] * 10
    decision = decide(evidence(same, same), GATE)
    assert not decision.promoted
    assert {r.rule for r in decision.failed_rules} == {"min_delta", "significant"}
    assert "delta +0.000 < min_delta 0.020" in rule(decision, "min_delta").detail
    assert "p = 1 > alpha 0.05" in rule(decision, "significant").detail


def test_a_small_gain_within_noise_is_rejected_for_significance_only() -> None:
    candidate = [1.0] * 11 + [0.0] * 9  # one more right answer out of 20: delta 0.05, p = 0.5
    reference = [1.0] * 10 + [0.0] * 10
    decision = decide(evidence(candidate, reference), GATE)
    assert [r.rule for r in decision.failed_rules] == ["significant"]


def test_forgetting_the_canary_set_blocks_a_better_task_score() -> None:
    decision = decide(evidence(*CLEARLY_BETTER, candidate_canary=0.2, base_canary=0.9), GATE)
    assert not decision.promoted
    assert [r.rule for r in decision.failed_rules] == ["canary"]
    canary = rule(decision, "canary")
    assert canary.observed == 0.9 - 0.2
    assert "drop +0.700 > max_canary_drop 0.100" in canary.detail


def test_canary_drop_exactly_at_the_limit_passes() -> None:
    decision = decide(evidence(*CLEARLY_BETTER, candidate_canary=0.7, base_canary=0.8), GATE)
    assert rule(decision, "canary").passed


def test_losing_to_the_few_shot_prompt_blocks_promotion_unless_disabled() -> None:
    decision = decide(evidence(*CLEARLY_BETTER, few_shot=0.95), GATE)
    assert [r.rule for r in decision.failed_rules] == ["few_shot"]
    lenient = PromotionConfig(beat_few_shot=False)
    assert decide(evidence(*CLEARLY_BETTER, few_shot=0.95), lenient).promoted


def test_unanswered_requests_reject_and_are_named() -> None:
    decision = decide(evidence(*CLEARLY_BETTER, unanswered={"candidate/task": 3, "base/canary": 0}), GATE)
    assert [r.rule for r in decision.failed_rules] == ["answered"]
    detail = rule(decision, "answered").detail
    assert "3 request(s) failed after retries (candidate/task: 3)" in detail
    assert "base/canary" not in detail  # only the gaps are named


def test_decision_serialises_with_reasons() -> None:
    same = [1.0, 0.0] * 5
    record = decide(evidence(same, same), GATE).as_dict()
    text = json.dumps(record)
    assert record["promoted"] is False
    assert record["reasons"] == [r["detail"] for r in record["rules"] if not r["passed"]]
    assert "min_delta" in text
