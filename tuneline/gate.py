"""The promotion gate: should the candidate replace the model in service? (pure, no I/O)

The candidate is compared with the current champion, or with the base model when there is no
champion yet. It is promoted only when every rule passes:
- `answered`: every request of the compared models came back (a failed request is not a wrong answer,
  so a comparison with gaps decides nothing);
- `min_delta`: it beats the reference on the primary metric by at least `min_delta`;
- `significant`: the one-sided paired test on the same examples has p <= `alpha`;
- `canary`: its canary (general knowledge) score is not lower than the base model's by more than
  `max_canary_drop` (the guard against forgetting);
- `few_shot` (when `beat_few_shot` and a few-shot baseline was run): it scores at least as well as the
  base model prompted with k training examples, else the fine-tune bought nothing a prompt could not.
Every rule is reported with its figures, passed or not, so a rejection always says why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from tuneline.config import PromotionConfig
from tuneline.metrics import PairedTest

# Differences of means over a few hundred examples are exact fractions; this absorbs float noise
# so that a delta of exactly `min_delta` passes.
_EPSILON = 1e-9

ReferenceRole = Literal["champion", "base"]


@dataclass(frozen=True, slots=True)
class RuleResult:
    rule: str
    passed: bool
    observed: float
    threshold: float
    detail: str

    def __str__(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.rule}: {self.detail}"


@dataclass(frozen=True, slots=True)
class GateEvidence:
    """The figures the gate decides on, all measured on the same eval examples."""

    primary_metric: str
    reference: ReferenceRole
    reference_model: str
    candidate_task: float
    reference_task: float
    paired: PairedTest
    candidate_canary: float
    base_canary: float
    few_shot_task: float | None = None
    # Requests that failed after retries, per "<role>/<set>" (only roles the gate compares).
    unanswered: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Decision:
    promoted: bool
    reference: ReferenceRole
    reference_model: str
    rules: tuple[RuleResult, ...]

    @property
    def failed_rules(self) -> tuple[RuleResult, ...]:
        return tuple(r for r in self.rules if not r.passed)

    def summary(self) -> str:
        verdict = "PROMOTED" if self.promoted else "REJECTED"
        against = f"against the {self.reference} ({self.reference_model})"
        lines = [f"{verdict} {against}", *(f"  {rule}" for rule in self.rules)]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "promoted": self.promoted,
            "reference": self.reference,
            "reference_model": self.reference_model,
            "rules": [asdict(rule) for rule in self.rules],
            "reasons": [rule.detail for rule in self.failed_rules],
        }


def decide(evidence: GateEvidence, promotion: PromotionConfig) -> Decision:
    """Apply every rule of the gate (none short-circuits, so all figures are reported)."""
    metric = evidence.primary_metric
    ref = evidence.reference
    unanswered = sum(evidence.unanswered.values())
    gaps = ", ".join(f"{k}: {v}" for k, v in sorted(evidence.unanswered.items()) if v)
    rules = [
        RuleResult(
            "answered",
            unanswered == 0,
            float(unanswered),
            0.0,
            "every request was answered"
            if unanswered == 0
            else f"{unanswered} request(s) failed after retries ({gaps}): the comparison has gaps",
        )
    ]

    delta = evidence.candidate_task - evidence.reference_task
    rules.append(
        RuleResult(
            "min_delta",
            delta + _EPSILON >= promotion.min_delta,
            delta,
            promotion.min_delta,
            f"task {metric} {evidence.candidate_task:.3f} vs {ref} {evidence.reference_task:.3f}: "
            f"delta {delta:+.3f} {'>=' if delta + _EPSILON >= promotion.min_delta else '<'} "
            f"min_delta {promotion.min_delta:.3f}",
        )
    )

    paired = evidence.paired
    significant = paired.p_value <= promotion.alpha
    rules.append(
        RuleResult(
            "significant",
            significant,
            paired.p_value,
            promotion.alpha,
            f"{paired.method} on {paired.n} paired examples ({paired.wins} better, {paired.losses} worse, "
            f"{paired.ties} same): p = {paired.p_value:.4g} {'<=' if significant else '>'} "
            f"alpha {promotion.alpha:g}",
        )
    )

    drop = evidence.base_canary - evidence.candidate_canary
    kept = drop <= promotion.max_canary_drop + _EPSILON
    rules.append(
        RuleResult(
            "canary",
            kept,
            drop,
            promotion.max_canary_drop,
            f"canary {metric} {evidence.candidate_canary:.3f} vs base {evidence.base_canary:.3f}: "
            f"drop {drop:+.3f} {'<=' if kept else '>'} max_canary_drop {promotion.max_canary_drop:.3f}",
        )
    )

    if promotion.beat_few_shot and evidence.few_shot_task is not None:
        margin = evidence.candidate_task - evidence.few_shot_task
        rules.append(
            RuleResult(
                "few_shot",
                margin + _EPSILON >= 0,
                margin,
                0.0,
                f"task {metric} {evidence.candidate_task:.3f} vs base few-shot "
                f"{evidence.few_shot_task:.3f}: margin {margin:+.3f} "
                f"{'>=' if margin + _EPSILON >= 0 else '<'} 0",
            )
        )

    return Decision(
        promoted=all(r.passed for r in rules),
        reference=ref,
        reference_model=evidence.reference_model,
        rules=tuple(rules),
    )
