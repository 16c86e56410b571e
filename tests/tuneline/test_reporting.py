"""The Markdown run summaries published on every flow run."""

from __future__ import annotations

import re

from tuneline.config import PromotionConfig
from tuneline.gate import GateEvidence, decide
from tuneline.metrics import paired_test
from tuneline.reporting import (
    BackfillDay,
    RunSummary,
    headline_metrics,
    render_backfill_summary,
    render_rollback_summary,
    render_run_summary,
)

RUN_URL = "http://127.0.0.1:5000/#/experiments/1/runs/0123abcd"


def manifest(dataset_hash: str = "9f2c" * 16, **by_reason: int) -> dict:
    quarantined = sum(by_reason.values())
    return {
        "dataset_hash": dataset_hash,
        "published": True,
        "problems": [],
        "counts": {
            "input_records": 100 + quarantined,
            "kept": 100,
            "quarantined": quarantined,
            "quarantined_by_reason": by_reason,
            "train": 92,
            "validation": 10,
            "general_mixed": 2,
        },
        "tokens": {"encoding": "o200k_base", "train_total": 12_345, "mean_example": 61.5},
        "cost": {"estimated_cost_usd": 0.1852, "n_epochs": 3, "within_cap": True},
    }


def decision(candidate: list[int], reference: list[int], canary: float = 0.8) -> dict:
    evidence = GateEvidence(
        primary_metric="exact_match",
        reference="champion",
        reference_model="ft:tuneline-tiny:local:support:aaaa1111",
        candidate_task=sum(candidate) / len(candidate),
        reference_task=sum(reference) / len(reference),
        paired=paired_test(candidate, reference),
        candidate_canary=canary,
        base_canary=0.8,
    )
    return decide(evidence, PromotionConfig(beat_few_shot=False)).as_dict()


def table_rows(markdown: str, header: str) -> list[list[str]]:
    """The cells of the table whose header row starts with `header` (escaped pipes stay in cells)."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_counts_by_reason_most_frequent_first_and_summing_to_quarantined() -> None:
    md = render_run_summary(
        RunSummary(
            flow="prepare",
            as_of="2026-11-05",
            manifest=manifest(exact_duplicate=7, invalid_json=3, secret_detected=3, too_long=1),
            mlflow_run_url=RUN_URL,
        )
    )
    rows = table_rows(md, "| reason |")
    assert rows == [
        ["`exact_duplicate`", "7"],
        ["`invalid_json`", "3"],
        ["`secret_detected`", "3"],
        ["`too_long`", "1"],
    ]
    counts = dict(table_rows(md, "| records |"))
    assert counts["quarantined"] == "14" and counts["input records"] == "114"
    assert sum(int(n) for _, n in rows) == int(counts["quarantined"])


def test_tokens_cost_and_the_mlflow_link_are_shown() -> None:
    md = render_run_summary(
        RunSummary(
            flow="retrain",
            manifest=manifest(),
            actual_cost_usd=0.0,
            mlflow_run_url=RUN_URL,
            mlflow_hint="start it with `tuneline ui`",
        )
    )
    figures = dict(table_rows(md, "| figure |"))
    assert figures["tokens train_total"] == "12,345"
    assert figures["cost estimated_cost_usd"] == "$0.1852"
    assert figures["cost actual_usd"] == "$0.00"
    assert f"[{RUN_URL}]({RUN_URL}) (start it with `tuneline ui`)" in md
    assert f"**Dataset hash:** `{'9f2c' * 16}`" in md


def test_a_prepare_run_has_no_job_metrics_or_decision_sections() -> None:
    md = render_run_summary(RunSummary(flow="prepare", manifest=manifest(), mlflow_run_url=RUN_URL))
    assert "## Data" in md and "## Tokens and cost" in md
    assert "## Training job" not in md and "## Metrics" not in md and "## Decision" not in md


def test_an_unpublished_dataset_says_why() -> None:
    blocked = {
        **manifest(),
        "published": False,
        "problems": ["data quality: quarantined fraction 0.62 > 0.5"],
    }
    md = render_run_summary(RunSummary(flow="prepare", manifest=blocked))
    assert "**Not published**" in md and "- data quality: quarantined fraction 0.62 > 0.5" in md
    assert "**MLflow run:** not recorded" in md


def test_promoted_decision_lists_every_rule_as_passed() -> None:
    better = decision([1] * 40, [1] * 10 + [0] * 30)
    assert better["promoted"]
    md = render_run_summary(RunSummary(flow="retrain", decision=better, mlflow_run_url=RUN_URL))
    assert "**PROMOTED** against the champion (`ft:tuneline-tiny:local:support:aaaa1111`)" in md
    rows = table_rows(md, "| rule |")
    assert [r[0] for r in rows] == [r["rule"] for r in better["rules"]]
    assert all(r[1] == "pass" for r in rows)


def test_rejected_decision_marks_the_failing_rule_with_its_figures() -> None:
    forgot = decision([1] * 40, [1] * 10 + [0] * 30, canary=0.2)
    assert not forgot["promoted"]
    md = render_run_summary(RunSummary(flow="retrain", decision=forgot))
    assert "**REJECTED** against the champion" in md
    canary = next(r for r in table_rows(md, "| rule |") if r[0] == "canary")
    assert canary[1] == "FAIL" and "drop +0.600" in canary[2]


def test_job_and_metrics_tables_and_pipes_inside_cells_stay_in_their_cell() -> None:
    job = {"id": "ftjob-abc", "status": "succeeded", "fine_tuned_model": "ft:m|x", "trained_tokens": 36_000}
    md = render_run_summary(
        RunSummary(
            flow="retrain",
            job=job,
            metrics={"eval/task/candidate/exact_match": 0.75, "train_loss": 0.1234567},
        )
    )
    assert dict(table_rows(md, "| field |")) == {
        "id": "ftjob-abc",
        "status": "succeeded",
        "fine_tuned_model": "ft:m\\|x",
        "trained_tokens": "36,000",
    }
    assert dict(table_rows(md, "| metric |")) == {
        "`eval/task/candidate/exact_match`": "0.75",
        "`train_loss`": "0.1235",
    }


def test_a_summary_shows_exact_match_of_each_model_and_set_only() -> None:
    metrics = {
        "eval/task/candidate/exact_match": 0.84,
        "eval/task/candidate/exact_match_ci_low": 0.75,
        "eval/canary/base/exact_match": 1.0,
        "eval/task/candidate/token_f1": 0.9,
        "train_loss": 0.1,
    }
    assert headline_metrics(metrics) == {
        "eval/task/candidate/exact_match": 0.84,
        "eval/canary/base/exact_match": 1.0,
    }


def test_rollback_summary_says_where_champion_moved_who_and_why() -> None:
    markdown = render_rollback_summary(
        "support-assistant", "2", "1", "ft:tiny:x|y", "oncall", "bad | refunds"
    )
    assert markdown.startswith("# rollback of support-assistant\n")
    assert "**Champion:** version 2 -> **version 1** (`ft:tiny:x\\|y`)" in markdown
    assert "**By:** oncall" in markdown and "**Why:** bad \\| refunds" in markdown


def test_backfill_summary_one_row_per_date_in_date_order() -> None:
    days = [
        BackfillDay(
            "2026-11-03",
            "retrained",
            manifest("b" * 64, near_duplicate=2),
            "ft:tiny:2",
            decision([1] * 40, [0] * 40),
            RUN_URL,
        ),
        BackfillDay(
            "2026-11-01",
            "retrained",
            manifest("a" * 64, invalid_json=1, exact_duplicate=4),
            "ft:tiny:1",
            None,
            RUN_URL,
        ),
        BackfillDay("2026-11-02", "unchanged", manifest("a" * 64, invalid_json=1, exact_duplicate=4)),
    ]
    md = render_backfill_summary("2026-11-01", "2026-11-03", "retrain", days, mlflow_run_url=RUN_URL)
    assert md.startswith("# backfill 2026-11-01 to 2026-11-03 (retrain)")
    assert "3 dates: 2 retrained, 1 unchanged" in md
    rows = table_rows(md, "| date |")
    assert [r[0] for r in rows] == ["2026-11-01", "2026-11-02", "2026-11-03"]
    first, second, third = rows
    assert first[1:7] == [
        "retrained",
        f"`{'a' * 12}`",
        "105",
        "100",
        "5",
        "exact_duplicate 4, invalid_json 1",
    ]
    assert first[7:] == ["12,345", "$0.1852", "`ft:tiny:1`", "-", f"[run]({RUN_URL})"]
    assert second[1] == "unchanged" and second[-3:] == ["-", "-", "-"]
    assert third[-2] == "PROMOTED"


def test_prepare_backfill_has_no_candidate_or_decision_columns() -> None:
    md = render_backfill_summary(
        "2026-11-01", "2026-11-01", "prepare", [BackfillDay("2026-11-01", "prepared", manifest())]
    )
    assert "1 date: 1 prepared" in md
    header = next(line for line in md.splitlines() if line.startswith("| date |"))
    assert "candidate" not in header and "decision" not in header
    assert len(table_rows(md, "| date |")[0]) == 10


def test_a_candidate_promoted_to_challenger_says_so() -> None:
    from tuneline.reporting import RunSummary, render_run_summary

    decision = {
        "promoted": True,
        "alias": "challenger",
        "reference": "champion",
        "reference_model": "ft:a",
        "rules": [],
    }
    assert "**PROMOTED to challenger (A/B)** against the champion" in render_run_summary(
        RunSummary(flow="retrain", decision=decision)
    )
    direct = {**decision, "alias": "champion"}
    assert "**PROMOTED** against the champion" in render_run_summary(
        RunSummary(flow="retrain", decision=direct)
    )


def test_a_promotion_links_the_model_version() -> None:
    url = "http://127.0.0.1:5000/#/models/support-assistant/versions/3"
    md = render_run_summary(
        RunSummary(
            flow="retrain",
            mlflow_run_url=RUN_URL,
            model_version="support-assistant version 3",
            model_version_url=url,
        )
    )
    assert f"**Model version:** [support-assistant version 3]({url}) (now `champion`)" in md
    assert "Model version" not in render_run_summary(RunSummary(flow="retrain", mlflow_run_url=RUN_URL))
