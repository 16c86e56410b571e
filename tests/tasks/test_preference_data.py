"""Preference (DPO) and reinforcement lines through the data plane: ingest -> validate -> dedupe ->
quality -> export, on real files, with every input line ending in exactly one place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest

from tuneline import engines, formats, records, text_store
from tuneline.config import Config, ValidationConfig, parse_config
from tuneline.tasks import dedupe, export, ingest, quality, validate

SECRET = "AKIAIOSFODNN7EXAMPLE"
RULES = ValidationConfig(min_examples=3, max_quarantine_fraction=0.7)
GRADER = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.reference_answer}}",
    "operation": "eq",
}
EVAL = [
    {
        "messages": [
            {"role": "user", "content": "my parcel never arrived at the depot in leeds"},
            {"role": "assistant", "content": "Category: delivery."},
        ]
    }
]


def pair(question: str, good: str, bad: str) -> dict[str, Any]:
    return {
        "input": {"messages": [{"role": "user", "content": question}]},
        "preferred_output": [{"role": "assistant", "content": good}],
        "non_preferred_output": [{"role": "assistant", "content": bad}],
    }


def prompt(question: str, reference: Any, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}], "reference_answer": reference, **fields}


def chat(question: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def config_for(method: str, **training: Any) -> Config:
    raw: dict[str, Any] = {
        "data": {"sources": [{"name": "x", "uri": "unused"}]},
        "training": {"method": method, **training},
        "validation": RULES.model_dump(),
        "export": {"validation_fraction": 0.25},
    }
    return parse_config(raw)


def run_stages(tmp_path: Path, lines: list[Any], config: Config) -> tuple[pd.DataFrame, export.Dataset, Any]:
    """Write the lines as one partition file and run the stages the prepare flow runs."""
    folder = tmp_path / "dt=2026-11-20"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "part-0.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    frame = ingest.read_files([ingest.jsonl_file(str(path), "prefs")], config.model.system_prompt)
    method = config.training.method
    frame = validate.validate(frame, config.model, config.validation, method)
    frame = dedupe.dedupe(frame, EVAL, config.dedupe)
    verdict = quality.check_quality(frame, config.model, config.validation, method)
    return frame, export.build_dataset(frame, config), verdict


def reasons_by_line(frame: pd.DataFrame) -> dict[int, str | None]:
    return {
        int(line): (None if pd.isna(reason) else str(reason))
        for line, reason in zip(frame[records.LINE], frame[records.REASON], strict=True)
    }


PREFERENCE_LINES: list[Any] = [
    pair("where is my refund for order 1", "Category: billing.", "Category: delivery."),  # 1 kept
    pair("how do I reset my password today", "Category: account.", "Category: billing."),  # 2 kept
    pair("the app crashes when I open settings", "Category: technical.", "Category: billing."),  # 3
    pair("can I change the card on my plan", "Category: billing.", "Category: account."),  # 4 kept
    chat("a supervised chat line in a dpo batch", "Category: billing."),  # 5 wrong_method_format
    {  # 6: two user turns: not single-turn
        **pair("first", "Category: billing.", "Category: account."),
        "input": {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
    },
    # 7: same input and preferred answer as 1, another non-preferred answer: a duplicate
    pair("where is my refund for order 1", "Category: billing.", "Category: account."),
    # 8: 3 with the answers swapped: a contradiction (keep-latest keeps 8)
    pair("the app crashes when I open settings", "Category: billing.", "Category: technical."),
    # 9: the input of an eval example
    pair("My parcel never arrived at the depot in Leeds!", "Category: delivery.", "Category: billing."),
    # 10: a credential in the non-preferred answer
    pair("what is my api key", "I cannot share keys.", f"Your key is {SECRET}."),
    "{not json",  # 11
    # 12: the same input as 2 with another preferred answer: no contradiction (both prefer over billing)
    pair("how do I reset my password today", "Category: security.", "Category: billing."),
    {"prompt": "a legacy line", "completion": "Category: billing."},  # 13 wrong_method_format
]


def test_preference_lines_through_the_data_plane(tmp_path: Path) -> None:
    lines = PREFERENCE_LINES
    frame, dataset, verdict = run_stages(tmp_path, lines, config_for("dpo"))
    assert reasons_by_line(frame) == {
        1: None,
        2: None,
        3: records.CONTRADICTION,
        4: None,
        5: "wrong_method_format",
        6: "invalid_preference_example",
        7: records.EXACT_DUPLICATE,
        8: None,
        9: records.EVAL_LEAKAGE,
        10: records.SECRET_DETECTED,
        11: records.INVALID_JSON,
        12: None,
        13: "wrong_method_format",
    }
    details = dict(zip(frame[records.LINE], frame[records.DETAIL], strict=True))
    assert "preferred and non-preferred answers swapped" in details[3]
    assert "dpo training file" in details[5] and "preference" in details[5]
    ids = dict(zip(frame[records.LINE], frame[records.RECORD_ID], strict=True))
    assert frame.set_index(records.LINE).loc[7, records.DUPLICATE_OF] == ids[1]
    assert frame.set_index(records.LINE).loc[3, records.DUPLICATE_OF] == ids[8]
    assert verdict.success, verdict.failures
    counts = dataset.counts
    assert counts["input_records"] == len(lines) == counts["kept"] + counts["quarantined"]
    assert sum(counts["quarantined_by_reason"].values()) == counts["quarantined"] == 8
    assert counts["train"] + counts["validation"] == counts["kept"] == 5 and counts["general_mixed"] == 0
    exported = [orjson.loads(line) for line in dataset.train_lines + dataset.validation_lines]
    assert all(formats.kind_for_method(e, "dpo") == "preference" for e in exported)
    assert all(formats.check_for_method(e, "dpo") is None for e in exported)
    body = b"".join(dataset.train_lines + dataset.validation_lines + dataset.quarantine_lines)
    assert SECRET.encode() not in body


def test_the_engines_screen_gives_preference_lines_the_same_outcome(tmp_path: Path) -> None:
    # The screen hands on each example as its training line: rule 5 must still see the swapped pair
    # (3 and 8), and export must write the same bytes.
    config = config_for("dpo")
    frame, dataset, _ = run_stages(tmp_path, PREFERENCE_LINES, config)
    files = [ingest.jsonl_file(str(tmp_path / "dt=2026-11-20" / "part-0.jsonl"), "prefs")]
    screened = engines.screen(files, config, EVAL)
    stored = text_store.examples(screened.frame, np.arange(len(screened.frame)), screened.texts)
    assert all(isinstance(e, bytes | None) for e in stored)
    assert screened.frame[records.EXAMPLE].isna().all()  # each line is in the store, not the frame
    screened_frame = dedupe.batch_rules(screened.frame, screened.documents, config.dedupe)
    assert reasons_by_line(screened_frame) == reasons_by_line(frame)
    assert list(screened_frame[records.DUPLICATE_OF]) == list(frame[records.DUPLICATE_OF])
    from_lines = export.build_dataset(screened_frame, config, texts=screened.texts)
    assert from_lines.train_lines == dataset.train_lines
    assert from_lines.validation_lines == dataset.validation_lines
    assert from_lines.quarantine_lines == dataset.quarantine_lines
    assert from_lines.dataset_hash == dataset.dataset_hash


def test_reinforcement_lines_through_the_data_plane(tmp_path: Path) -> None:
    lines: list[Any] = [
        prompt("which category is a refund request", "billing"),  # 1 kept
        prompt("which category is a lost parcel", "delivery", difficulty=2),  # 2 kept
        prompt("which category is a password reset", "account"),  # 3 kept
        prompt("which category is a crashing app", "technical"),  # 4: contradicted by 8, which is kept
        chat("which category is a broken link", "technical"),  # 5: ends with the assistant turn
        pair("a preference line", "Category: billing.", "Category: account."),  # 6 wrong_method_format
        {"messages": [{"role": "user", "content": "x"}], "bad key": 1},  # 7 not a template name
        prompt("which category is a crashing app", "billing"),  # 8: same prompt, other reference
        prompt("which category is a refund request", "billing"),  # 9 exact duplicate of 1
        prompt("which category is an expired card", f"billing {SECRET}"),  # 10 secret in a grader field
        prompt("my parcel never arrived at the depot in leeds", "delivery"),  # 11 eval leakage
        {"messages": [], "reference_answer": "x"},  # 12 empty messages
    ]
    frame, dataset, verdict = run_stages(tmp_path, lines, config_for("reinforcement", grader=GRADER))
    assert reasons_by_line(frame) == {
        1: None,
        2: None,
        3: None,
        4: records.CONTRADICTION,
        5: "invalid_reinforcement_example",
        6: "wrong_method_format",
        7: "invalid_reinforcement_example",
        8: None,
        9: records.EXACT_DUPLICATE,
        10: records.SECRET_DETECTED,
        11: records.EVAL_LEAKAGE,
        12: "invalid_reinforcement_example",
    }
    assert set(frame.loc[frame[records.REASON].isna(), records.KIND]) == {"reinforcement"}
    assert verdict.success, verdict.failures
    counts = dataset.counts
    assert counts["input_records"] == len(lines) == counts["kept"] + counts["quarantined"]
    assert counts["train"] + counts["validation"] == counts["kept"] == 4
    exported = [orjson.loads(line) for line in dataset.train_lines + dataset.validation_lines]
    assert {e["reference_answer"] for e in exported} == {"billing", "delivery", "account"}
    assert any(e.get("difficulty") == 2 for e in exported)  # grader fields travel with the line
    assert SECRET.encode() not in b"".join(dataset.quarantine_lines)


def test_supervised_batches_quarantine_other_methods_lines(tmp_path: Path) -> None:
    lines = [chat(f"supervised question {i}", "Category: billing.") for i in range(4)]
    lines.append(pair("a preference line", "Category: billing.", "Category: account."))
    frame, dataset, verdict = run_stages(tmp_path, lines, config_for("supervised"))
    assert reasons_by_line(frame)[5] == "wrong_method_format"
    assert verdict.success and dataset.counts["kept"] == 4


def test_the_quality_suite_refuses_a_batch_of_another_methods_format(tmp_path: Path) -> None:
    lines = [pair(f"question number {i}", "Category: billing.", "Category: account.") for i in range(4)]
    config = config_for("dpo")
    frame = ingest.read_files([], None)
    folder = tmp_path / "dt=2026-11-20"
    folder.mkdir()
    (folder / "p.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    frame = ingest.read_files([ingest.jsonl_file(str(folder / "p.jsonl"), "x")], None)
    frame = validate.validate(frame, config.model, config.validation, "dpo")
    assert quality.check_quality(frame, config.model, config.validation, "dpo").success
    # The same kept preference rows checked as a supervised batch break the one-format expectation.
    verdict = quality.check_quality(frame, config.model, config.validation, "supervised")
    assert not verdict.success and any("preference" in f or "chat line" in f for f in verdict.failures)


@pytest.mark.parametrize(
    ("method", "line", "key"),
    [
        ("dpo", chat("q", "a"), "wrong_method_format"),
        ("supervised", pair("q", "a", "b"), "wrong_method_format"),
        ("reinforcement", pair("q", "a", "b"), "wrong_method_format"),
        ("reinforcement", chat("q", "a"), "invalid_reinforcement_example"),
        ("dpo", {**pair("q", "a", "b"), "non_preferred_output": []}, "invalid_preference_example"),
        ("reinforcement", prompt("q", "<|endoftext|>"), "forbidden_special_token"),
    ],
)
def test_training_files_are_checked_by_method(method: str, line: dict[str, Any], key: str) -> None:
    good = {"dpo": pair("q", "a", "b"), "supervised": chat("q", "a"), "reinforcement": prompt("q", "a")}[
        method
    ]
    body = [json.dumps(good).encode() + b"\n"] * 3 + [json.dumps(line).encode() + b"\n"]
    count, issue = formats.check_training_file(body, min_examples=1, method=method)  # type: ignore[arg-type]
    assert count == 3 and issue is not None and (issue.line, issue.key) == (4, key)
    assert formats.check_training_file(body[:3], min_examples=1, method=method) == (3, None)  # type: ignore[arg-type]


REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tuneline demo-data --preferences`, once for the module."""
    from tuneline.demo import generator

    out = tmp_path_factory.mktemp("demo")
    data = generator.generate(out, preferences=True)
    committed = {
        p.relative_to(REPOSITORY / "data").as_posix() for p in (REPOSITORY / "data").rglob("*") if p.is_file()
    }
    added = set(data.files) - committed
    assert committed <= set(data.files) and added  # the option only adds files: data/ stays as it was
    assert {p.split("/dt=")[0] for p in added} == {"raw/support_preferences", "raw/support_prompts"}
    return out


@pytest.mark.parametrize(
    ("config_file", "folder", "planted"),
    [
        ("configs/local-dpo.yaml", "support_preferences", {"exact_duplicate": 1, "contradiction": 1}),
        ("configs/local-reinforcement.yaml", "support_prompts", {}),
    ],
)
def test_the_demo_partitions_through_the_example_configs(
    demo_data: Path, config_file: str, folder: str, planted: dict[str, int]
) -> None:
    """`tuneline demo-data --preferences` data with configs/local-dpo.yaml and local-reinforcement.yaml:
    every planted record gets its reason, every other line is kept, and the batch passes the suite."""
    from datetime import date

    from tuneline.config import load_config
    from tuneline.demo import generator

    config = load_config(
        REPOSITORY / config_file,
        overrides={
            "data.sources": [{"name": "demo", "uri": str(demo_data / "raw" / folder / "dt=*" / "*.jsonl")}],
            "data.eval_set": str(demo_data / generator.EVAL_PATH),
        },
    )
    selection = ingest.select_files(config.data.sources, date(2026, 11, 21), 1)
    assert len(selection.files) == 1
    frame = ingest.read_files(selection.files, config.model.system_prompt)
    method = config.training.method
    frame = validate.validate(frame, config.model, config.validation, method)
    eval_examples = [json.loads(line) for line in (demo_data / generator.EVAL_PATH).read_text().splitlines()]
    frame = dedupe.dedupe(frame, eval_examples, config.dedupe)
    assert records.counts_by_reason(frame) == planted
    if planted:
        # The last two lines: a duplicate of the first pair (input + preferred answer), and the second
        # pair swapped, which keep-latest keeps, quarantining the second line it contradicts.
        reasons = reasons_by_line(frame)
        last = len(frame)
        ids = dict(zip(frame[records.LINE], frame[records.RECORD_ID], strict=True))
        of = dict(zip(frame[records.LINE], frame[records.DUPLICATE_OF], strict=True))
        assert (reasons[last - 1], of[last - 1]) == (records.EXACT_DUPLICATE, ids[1])
        assert (reasons[2], of[2]) == (records.CONTRADICTION, ids[last])
    verdict = quality.check_quality(frame, config.model, config.validation, method)
    assert verdict.success, verdict.failures
    dataset = export.build_dataset(frame, config)
    assert dataset.counts["train"] + dataset.counts["validation"] == dataset.counts["kept"] > 50


def test_few_shot_examples_come_from_preference_lines_too() -> None:
    from tuneline.tasks.evaluate import select_few_shot

    lines = [
        pair("where is my refund", "Category: billing.", "Category: delivery."),
        pair("my parcel is late", "Category: delivery.", "Category: billing."),
        prompt("a reinforcement prompt has no answer to show", "billing"),
    ]
    shots = select_few_shot(lines, 4)
    assert [(s.user, s.assistant) for s in shots] == [
        ("where is my refund", "Category: billing."),
        ("my parcel is late", "Category: delivery."),
    ]


def test_a_chat_line_with_parallel_tool_calls_is_still_a_chat_line_to_dedupe(tmp_path: Path) -> None:
    """Only a reinforcement line's grader fields become its answer: `parallel_tool_calls` on a chat
    line is no grader field, so the same question with two answers is still a contradiction."""
    tool = {"type": "function", "function": {"name": "track", "parameters": {"type": "object"}}}
    lines = [
        {
            **chat("where is parcel 42 today", f"Category: delivery {n}."),
            "tools": [tool],
            "parallel_tool_calls": False,
        }
        for n in range(2)
    ] + [chat(f"an unrelated question number {n} about plans", "Category: billing.") for n in range(3)]
    frame, _, _ = run_stages(tmp_path, lines, config_for("supervised"))
    assert reasons_by_line(frame)[1] == records.CONTRADICTION
