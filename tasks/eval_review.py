"""What a reviewer sees of an evaluation in MLflow: the evaluation view, the tables, the chart, the report.

tasks/evaluate.py asks the models and computes the figures; this module lays them out on the run:
- the evaluation through `mlflow.genai.evaluate` on the answers already given (pre-computed outputs:
  no model is asked again): one row per eval example, its inputs the question, its outputs every
  model's answer (`candidate`, `champion`, `base`, `few_shot`), its expectation the reference answer,
  and code scorers (exact match, normalised match, token F1, label accuracy, and the judge's verdict
  where one ran) giving each model's verdict. The UI's evaluation view and Traces tab show them;
  the scorers log no aggregate metrics of their own (`aggregations=[]`): the run's headline figures are
  the ones the gate decides on (EvaluationResult.metrics), not a second, unpaired copy;
- the bootstrap intervals and per-label accuracy as tables (mlflow.log_table), the chart, and the
  whole evaluation as eval/report.json.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.entities import Feedback
from mlflow.genai.scorers import scorer

from tuneline.metrics import METRICS, SCORERS, answer_label
from tuneline.tracking import RunLog

if TYPE_CHECKING:  # evaluate.py imports this module to log its result
    from tuneline.tasks.evaluate import EvaluationResult, SetName

SETS: tuple[SetName, ...] = ("task", "canary")  # as tasks/evaluate.py names them, in the order they are shown
ROLE_COLOURS: dict[str, str] = {
    "candidate": "#1f77b4",
    "champion": "#2ca02c",
    "base": "#7f7f7f",
    "few_shot": "#ff7f0e",
}


def review_rows(result: EvaluationResult) -> list[dict[str, Any]]:
    """One row per eval example for mlflow.genai.evaluate: inputs (question, set, example id), outputs
    (each model's answer; `unanswered` names the models whose request failed, with the error) and the
    expected response. Judge scores, where the judge ran, travel in outputs as `judge`."""
    rows: list[dict[str, Any]] = []
    for set_name in SETS:
        roles = result.roles(set_name)
        if not roles:
            continue
        frame = result.answers[result.answers["set"] == set_name]
        by_role = {
            role: frame[frame["role"] == role].sort_values("position").reset_index(drop=True)
            for role in roles
        }
        first = by_role[roles[0]]
        for i in range(len(first)):
            outputs: dict[str, Any] = {role: str(by_role[role].loc[i, "answer"]) for role in roles}
            failed = {
                role: str(by_role[role].loc[i, "error"])
                for role in roles
                if isinstance(by_role[role].loc[i, "error"], str)
            }
            if failed:
                outputs["unanswered"] = failed
            if set_name == "task" and result.judge_scores:
                outputs["judge"] = {name: float(s[i]) for name, s in result.judge_scores.items()}
            rows.append(
                {
                    "inputs": {
                        "question": str(first.loc[i, "question"]),
                        "set": set_name,
                        "example_id": str(first.loc[i, "example_id"]),
                    },
                    "outputs": outputs,
                    "expectations": {"expected_response": str(first.loc[i, "reference"])},
                }
            )
    return rows


def _models(outputs: dict[str, Any]) -> list[str]:
    return [role for role in outputs if role not in {"unanswered", "judge"}]


def _metric_scorer(metric: str, score: Callable[[str, str], float]) -> Any:
    """A code scorer giving each model's `metric` on one example (0 for an unanswered request, as the
    gate counts it)."""

    def verdicts(outputs: dict[str, Any], expectations: dict[str, Any]) -> list[Feedback]:
        reference = str(expectations["expected_response"])
        failed = outputs.get("unanswered") or {}
        return [
            Feedback(
                name=f"{role}/{metric}",
                value=0.0 if role in failed else float(score(str(outputs[role]), reference)),
                rationale=f"unanswered: {failed[role]}" if role in failed else None,
            )
            for role in _models(outputs)
        ]

    return scorer(verdicts, name=metric, aggregations=[])


def _label_verdicts(outputs: dict[str, Any], expectations: dict[str, Any]) -> list[Feedback]:
    """Whether each model's answer carries the reference's `Category:` label (none when the reference
    has no label: the canary set)."""
    expected = answer_label(str(expectations["expected_response"]))
    if expected is None:
        return []
    return [
        Feedback(
            name=f"{role}/label_correct",
            value=answer_label(str(outputs[role])) == expected,
            rationale=f"expected label {expected!r}, answered {answer_label(str(outputs[role]))!r}",
        )
        for role in _models(outputs)
    ]


def _judge_verdicts(outputs: dict[str, Any]) -> list[Feedback]:
    """The pairwise judge's score of the candidate (1 win, 0.5 tie, 0 loss), asked in evaluate."""
    return [
        Feedback(name=f"judge/{name}", value=score) for name, score in (outputs.get("judge") or {}).items()
    ]


def review_scorers(result: EvaluationResult) -> list[Any]:
    """The code scorers of the evaluation view (see the module docstring)."""
    scorers = [_metric_scorer(metric, SCORERS[metric]) for metric in METRICS]
    scorers.append(scorer(_label_verdicts, name="label_accuracy", aggregations=[]))
    if result.judge_scores:
        scorers.append(scorer(_judge_verdicts, name="judge", aggregations=[]))
    return scorers


def intervals_table(result: EvaluationResult) -> pd.DataFrame:
    """One row per set, model and metric: the mean and its bootstrap interval."""
    rows = [
        {
            "set": set_name,
            "role": role,
            "model": result.models[role],
            "metric": metric,
            "mean": e.mean,
            "ci_low": e.low,
            "ci_high": e.high,
        }
        for (set_name, role, metric), e in result.estimates.items()
    ]
    rows += [
        {
            "set": "task",
            "role": "judge",
            "model": name,
            "metric": "win_rate",
            "mean": e.mean,
            "ci_low": e.low,
            "ci_high": e.high,
        }
        for name, e in result.judge.items()
    ]
    return pd.DataFrame.from_records(rows)


def label_table(result: EvaluationResult) -> pd.DataFrame:
    """One row per set, model and label: support, correct answers and accuracy."""
    rows = [
        {
            "set": set_name,
            "role": role,
            "label": label,
            "support": a.support,
            "correct": a.correct,
            "accuracy": a.accuracy,
        }
        for (set_name, role), labels in result.label_accuracy.items()
        for label, a in labels.items()
    ]
    return pd.DataFrame.from_records(rows)


def comparison_chart(result: EvaluationResult) -> Figure:
    """Grouped bars per metric and model with their confidence intervals, one panel per eval set."""
    sets = [s for s in SETS if result.roles(s)]
    figure = Figure(figsize=(5.5 * len(sets), 4.2), layout="constrained")
    axes = figure.subplots(1, len(sets), squeeze=False)[0]
    for axis, set_name in zip(axes, sets, strict=True):
        roles = result.roles(set_name)
        width = 0.8 / len(roles)
        positions = np.arange(len(METRICS))
        for offset, role in enumerate(roles):
            estimates = [result.estimate(set_name, role, metric) for metric in METRICS]
            means = np.array([e.mean for e in estimates])
            errors = np.array([[e.mean - e.low for e in estimates], [e.high - e.mean for e in estimates]])
            axis.bar(
                positions + (offset - (len(roles) - 1) / 2) * width,
                means,
                width,
                yerr=errors,
                capsize=3,
                label=f"{role} ({result.models[role]})" if len(result.models[role]) < 40 else role,
                color=ROLE_COLOURS[role],
            )
        axis.set_xticks(positions, [m.replace("_", " ") for m in METRICS])
        axis.set_ylim(0, 1.05)
        axis.set_title(f"{set_name} set (n={len(result.scores(set_name, roles[0], 'exact_match'))})")
        axis.legend(fontsize="small", loc="upper right")
    figure.suptitle("Candidate vs baselines (bars: mean, whiskers: bootstrap CI)")
    return figure


def report_document(result: EvaluationResult) -> dict[str, Any]:
    """The evaluation as one JSON document: models, settings, metrics, per-label accuracy, problems."""
    return {
        "models": dict(result.models),
        "champion_version": result.champion_version,
        "settings": dict(result.settings),
        "metrics": result.all_figures(),
        "label_accuracy": {
            f"{set_name}/{role}": {
                label: {"support": a.support, "correct": a.correct} for label, a in labels.items()
            }
            for (set_name, role), labels in result.label_accuracy.items()
        },
        "problems": list(result.problems),
        "preference_accuracy": {
            role: {
                "model": found.model,
                "accuracy": found.accuracy.mean,
                "ci": [found.accuracy.low, found.accuracy.high],
                "confidence": found.accuracy.confidence,
                "correct": found.correct,
                "pairs": found.accuracy.n,
                "mean_margin_nats": found.mean_margin,
                "reward_accuracy_vs_base": None
                if found.reward_accuracy is None
                else {
                    "accuracy": found.reward_accuracy.mean,
                    "ci": [found.reward_accuracy.low, found.reward_accuracy.high],
                },
                "interval": "wilson",
            }
            for role, found in result.preference.items()
        },
        "preference_note": result.preference_note,
    }


def log_result(run: RunLog, result: EvaluationResult) -> None:
    """Everything a reviewer needs, on the run: the headline metrics, the evaluation view, the
    side-by-side outputs, the intervals and per-label tables, the chart and the report."""
    tables: dict[str, pd.DataFrame] = {
        f"eval/{s}_outputs.json": result.side_by_side(s) for s in SETS if result.roles(s)
    }
    tables["eval/intervals.json"] = intervals_table(result)
    labels = label_table(result)
    if not labels.empty:
        tables["eval/label_accuracy.json"] = labels
    run.log_evaluation(
        metrics=result.metrics(),
        tables=tables,
        figures={"eval/comparison.png": comparison_chart(result)},
        documents={"eval/report.json": report_document(result)},
    )
    run.log_genai_evaluation(review_rows(result), review_scorers(result))
