from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pytest

from tuneline import records, sorted_lines, text_store
from tuneline.config import Config, load_config
from tuneline.tasks import dedupe, export, ingest, validate

RUN = export.RunContext(
    as_of="2025-03-10",
    config_hash="c" * 64,
    sources=[{"name": "s", "uri": "memory://x", "files": []}],
    partitions=["2025-03-10"],
)


def config(**sections: dict[str, Any]) -> Config:
    overrides = {
        f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()
    }
    return load_config(overrides=overrides)


BASE = config(export={"validation_fraction": 0.25, "general_mix_fraction": 0.0})


def chat(i: int, question: str | None = None) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": question or f"Question {i}: where is order {i * 7}?"},
            {"role": "assistant", "content": f"Shipping: order {i * 7} ships today. ünïcode {i}"},
        ]
    }


def prepared(lines: list[Any], cfg: Config = BASE) -> pd.DataFrame:
    """Lines through the real ingest and validate stages."""
    path = f"/export-{uuid.uuid4().hex}/part.jsonl"
    fs = fsspec.filesystem("memory")
    fs.pipe(path, ("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n").encode())
    try:
        frame = ingest.read_files(
            [ingest.InputFile("s", f"memory://{path}", "part.jsonl", "2025-03-10", "jsonl", None)], None
        )
    finally:
        fs.rm(path)
    return validate.validate(frame, cfg.model, cfg.validation)


def test_canonical_lines() -> None:
    example = {"b": 1, "a": {"z": "é", "y": [1, 2.5]}}
    assert export.canonical_line(example) == (
        json.dumps(example, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    )


def test_split_is_stable_across_order_and_variants() -> None:
    examples = [chat(i) for i in range(40)]
    forward = export.build_dataset(prepared(examples), BASE)
    backward = export.build_dataset(prepared(list(reversed(examples))), BASE)
    assert forward.train_lines == backward.train_lines
    assert forward.validation_lines == backward.validation_lines
    assert forward.dataset_hash == backward.dataset_hash
    assert 0 < len(forward.validation_lines) < 20  # about a quarter
    # A case/whitespace/punctuation variant lands on the same side as the original.
    variant = chat(3, "  QUESTION 3 -- where is ORDER 21 ")
    assert export.split_key(variant) == export.split_key(chat(3))
    assert export.split_key(chat(4)) != export.split_key(chat(3))
    # Another run with more data never moves an example to the other side.
    bigger = export.build_dataset(prepared([chat(i) for i in range(60)]), BASE)
    assert set(forward.validation_lines) <= set(bigger.validation_lines)
    assert set(forward.train_lines) <= set(bigger.train_lines)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.999999, 1.0])
def test_the_side_of_a_key_is_its_leading_bytes_as_a_number_in_0_1_against_the_fraction(
    fraction: float,
) -> None:
    """Decided for a chunk of keys at once in 64-bit integers, exactly as the number k / 2**64 against
    the fraction, including the keys on either side of the boundary."""
    from fractions import Fraction

    boundary = int(Fraction(fraction) * 2**64)
    numbers = [0, 1, 2**63, 2**64 - 1, *(b for b in range(boundary - 2, boundary + 3) if 0 <= b < 2**64)]
    numbers += [int.from_bytes(hashlib.sha256(str(i).encode()).digest()[:8], "big") for i in range(200)]
    keys = [n.to_bytes(8, "big") + hashlib.sha256(str(n).encode()).digest()[:24] for n in numbers]
    expected = [Fraction(n, 2**64) < Fraction(fraction) for n in numbers]
    assert export.validation_mask(keys, fraction).tolist() == expected


def test_the_split_reuses_dedupes_normalised_forms() -> None:
    frame = dedupe.dedupe(prepared([chat(i) for i in range(30)]), [], BASE.dedupe)
    assert frame[records.SPLIT_KEY].notna().all()
    with_forms = export.build_dataset(frame, BASE)
    without = export.build_dataset(frame.drop(columns=[records.SPLIT_KEY]), BASE)
    assert with_forms.train_lines == without.train_lines
    assert with_forms.validation_lines == without.validation_lines


def test_counts_invariant_and_files(tmp_path: Path) -> None:
    lines: list[Any] = [chat(i) for i in range(30)]
    lines += ["{broken", {"messages": [{"role": "bot", "content": "x"}]}, [1]]
    frame = prepared(lines)
    kept_rows = np.flatnonzero(records.kept_mask(frame).to_numpy())
    records.quarantine(
        frame,
        np.isin(np.arange(len(frame)), kept_rows[:2]),
        "exact_duplicate",
        "same as line 3",
        [frame[records.RECORD_ID].iloc[2]] * len(frame),
    )
    outcome = export.export(frame, BASE, RUN, tmp_path, quality=lambda: ([], "<html>report</html>"))
    assert outcome.published and outcome.problems == []
    counts = outcome.manifest["counts"]
    assert counts["input_records"] == 33 == counts["kept"] + counts["quarantined"]
    assert sum(counts["quarantined_by_reason"].values()) == counts["quarantined"] == 5
    assert counts["quarantined_by_reason"] == {
        "data_type": 1,
        "exact_duplicate": 2,
        "invalid_json": 1,
        "unrecognized_role": 1,
    }
    assert counts["kept"] == counts["train"] - counts["general_mixed"] + counts["validation"]

    train = (tmp_path / export.TRAIN_FILE).read_bytes()
    validation = (tmp_path / export.VALIDATION_FILE).read_bytes()
    assert outcome.manifest["dataset_hash"] == hashlib.sha256(train + b"\0" + validation).hexdigest()
    assert len(train.splitlines()) == counts["train"] and len(validation.splitlines()) == counts["validation"]
    for line in train.splitlines() + validation.splitlines():
        assert export.canonical_line(json.loads(line)) == line + b"\n"

    quarantined = [json.loads(x) for x in (tmp_path / export.QUARANTINE_FILE).read_text().splitlines()]
    assert len(quarantined) == 5
    assert set(quarantined[0]) == {
        "record_id",
        "source",
        "partition",
        "line",
        "first_line",
        "last_line",
        "reason",
        "detail",
        "duplicate_of",
        "raw",
    }
    by_reason = {q["reason"]: q for q in quarantined}
    assert by_reason["invalid_json"]["raw"] == "{broken" and by_reason["invalid_json"]["line"] == 31
    assert by_reason["exact_duplicate"]["duplicate_of"] == frame[records.RECORD_ID].iloc[2]
    assert by_reason["invalid_json"]["duplicate_of"] is None

    manifest = json.loads((tmp_path / export.MANIFEST_FILE).read_text())
    assert manifest == json.loads(json.dumps(outcome.manifest))
    for key in ("dataset_hash", "counts", "tokens", "cost", "sources", "partitions", "as_of", "config_hash"):
        assert key in manifest
    assert manifest["tokens"]["train_total"] > 0 and manifest["files"]["train"]["lines"] == counts["train"]
    for name, written in (("train", train), ("validation", validation)):
        described = manifest["files"][name]
        assert described["bytes"] == len(written) and described["lines"] == len(written.splitlines())
        assert described["sha256"] == hashlib.sha256(written).hexdigest()
    quarantine_file = (tmp_path / export.QUARANTINE_FILE).read_bytes()
    assert manifest["files"]["quarantine"]["sha256"] == hashlib.sha256(quarantine_file).hexdigest()
    assert manifest["files"]["quarantine"]["bytes"] == len(quarantine_file)
    assert manifest["cost"]["model"] == "tuneline-tiny" and manifest["cost"]["within_cap"] is True
    assert (tmp_path / export.REPORT_FILE).read_text() == "<html>report</html>"


def test_examples_kept_as_their_training_lines_export_the_same_bytes() -> None:
    frame = dedupe.dedupe(prepared([chat(i) for i in range(30)]), [], BASE.dedupe)
    examples = frame[records.EXAMPLE].to_numpy(dtype=object, copy=True)
    examples[4] = {**examples[4], "n": 2**70}  # kept, but JSON cannot represent it
    frame[records.EXAMPLE] = pd.Series(examples, index=frame.index, dtype=object)

    lines = export.with_training_lines(frame)
    values = lines[records.EXAMPLE].tolist()
    assert values[0] == export.canonical_line(examples[0]) and records.example_value(values[0]) == examples[0]
    assert values[4] is examples[4]  # left as it is: export quarantines it
    assert all(isinstance(v, bytes) for k, v in enumerate(values) if k != 4)
    assert frame[records.EXAMPLE].iloc[0] is examples[0]  # the input frame is not changed

    as_dicts, as_lines = export.build_dataset(frame, BASE), export.build_dataset(lines, BASE)
    assert as_lines.counts == as_dicts.counts and as_lines.counts["quarantined_by_reason"] == {"data_type": 1}
    assert (
        as_lines.train_lines == as_dicts.train_lines
        and as_lines.validation_lines == as_dicts.validation_lines
    )
    assert as_lines.quarantine_lines == as_dicts.quarantine_lines
    assert as_lines.dataset_hash == as_dicts.dataset_hash


def test_general_mix_is_a_deterministic_share_of_train(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(export={"validation_fraction": 0.2, "general_mix_fraction": 0.2})
    general_lines = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": str(2 * i)},
            ]
        }
        for i in range(50)
    ]
    general_lines.append(chat(1))  # already task data: never mixed in twice
    general_frame = prepared(general_lines, cfg)
    general = export.GeneralExamples(
        source="general.jsonl",
        examples=general_frame[records.EXAMPLE].tolist(),
        n_tokens=[int(x) for x in general_frame[records.N_TOKENS]],
        n_assistant_tokens=[int(x) for x in general_frame[records.N_ASSISTANT_TOKENS]],
    )
    task = prepared([chat(i) for i in range(40)], cfg)
    first = export.build_dataset(task, cfg, general)
    again = export.build_dataset(
        task,
        cfg,
        export.GeneralExamples(
            "general.jsonl",
            *[list(reversed(x)) for x in (general.examples, general.n_tokens, general.n_assistant_tokens)],
        ),
    )
    task_train = first.counts["train"] - first.counts["general_mixed"]
    assert first.counts["general_mixed"] == round(task_train * 0.2 / 0.8) > 0
    assert first.train_lines == again.train_lines and first.dataset_hash == again.dataset_hash
    general_set = {export.canonical_line(e) for e in general.examples[:-1]}
    assert sum(line in general_set for line in first.train_lines) == first.counts["general_mixed"]
    assert not general_set & set(first.validation_lines)
    assert first.tokens["general_total"] > 0
    assert first.tokens["train_total"] == first.cost["billed_tokens_per_epoch"]
    # Read a few examples at a time and sorted on disk over many key ranges: the same files.
    monkeypatch.setattr(export, "_EXPORT_CHUNK", 7)
    monkeypatch.setattr(sorted_lines, "_RANGE_BYTES", 300)
    small = export.build_dataset(task, cfg, general)
    assert small.train_lines == first.train_lines and small.validation_lines == first.validation_lines
    assert small.files == first.files and small.dataset_hash == first.dataset_hash
    assert small.counts == first.counts and small.tokens == first.tokens


def test_cost_cap_and_quality_failures_stop_publishing(tmp_path: Path) -> None:
    (tmp_path / export.TRAIN_FILE).write_text("stale\n")
    priced = config(model={"base": "gpt-4.1-mini"}, cost={"max_estimated_cost_usd": 0.0})
    frame = prepared([chat(i) for i in range(20)], priced)
    outcome = export.export(
        frame,
        priced,
        RUN,
        tmp_path,
        quality=lambda: (["at least 10 examples kept: observed 3"], "r"),
    )
    assert not outcome.published
    assert outcome.problems[0] == "data quality: at least 10 examples kept: observed 3"
    assert (
        outcome.problems[1].startswith("cost: estimated training cost $")
        and "cost.max_estimated_cost_usd = $0.00" in outcome.problems[1]
    )
    assert not (tmp_path / export.TRAIN_FILE).exists() and not (tmp_path / export.VALIDATION_FILE).exists()
    manifest = json.loads((tmp_path / export.MANIFEST_FILE).read_text())
    assert manifest["published"] is False and manifest["cost"]["within_cap"] is False
    assert "train" not in manifest["files"] and (tmp_path / export.QUARANTINE_FILE).exists()


@pytest.mark.parametrize("model", ["tuneline-tiny", "some-unpriced-model"])
def test_free_or_unpriced_models_are_within_the_cap(model: str) -> None:
    cfg = config(model={"base": model}, cost={"max_estimated_cost_usd": 0.0})
    dataset = export.build_dataset(prepared([chat(i) for i in range(5)], cfg), cfg)
    assert export.cost_problem(dataset) is None


AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
PROJECT_KEY = "sk-proj-" + "a1B2c3D4" * 6
KEY_BODY = "MIIEowIBAAKCAQEAx7Kq9ZtHc2S0vPq4Y5mWl3kR8nJb"
PRIVATE_KEY = f"-----BEGIN RSA PRIVATE KEY-----\n{KEY_BODY}\n-----END RSA PRIVATE KEY-----"
SECRETS = (AWS_KEY, PROJECT_KEY, KEY_BODY, "hunter2")


def with_secrets() -> list[Any]:
    """Records holding credentials, quarantined by dedupe and by earlier rules (which never scan them)."""
    return [
        *(chat(i) for i in range(12)),
        chat(50, f"My key is {AWS_KEY}, why is sign-in refused?"),  # secret_detected
        chat(51, f"Here is my key file:\n{PRIVATE_KEY}"),  # secret_detected, key body included
        {"messages": chat(52)["messages"], "api_key": PROJECT_KEY},  # example_unrecognized_key
        '{"messages": [{"role": "user", "content": "key ' + PROJECT_KEY + '"',  # invalid_json
        # The same key written with JSON escapes: the line's text never shows it as it is.
        '{"messages": [{"role": "user", "content": "\\u0041KIAIOSFODNN7EXAMPLE"}, {"role": "bot", "content": "x"}]}',
        chat(53, "log in at https://ana:hunter2@example.com please"),  # secret_detected (basic auth)
        chat(54, "mail me at ana@example.com"),  # PII: quarantined under dedupe.pii: quarantine
    ]


def test_quarantine_lines_never_hold_a_secret_but_say_where_and_which_detector() -> None:
    cfg = config(export={"general_mix_fraction": 0.0}, dedupe={"pii": "quarantine"})
    frame = dedupe.dedupe(prepared(with_secrets(), cfg), [], cfg.dedupe)
    dataset = export.build_dataset(frame, cfg)
    body = b"".join(dataset.quarantine_lines).decode()
    for secret in (*SECRETS, "ana@example.com"):
        assert secret not in body, secret
    entries = {e["line"]: e for e in map(json.loads, dataset.quarantine_lines)}
    assert {line: e["reason"] for line, e in entries.items()} == {
        13: "secret_detected",
        14: "secret_detected",
        15: "example_unrecognized_key",
        16: "invalid_json",
        17: "unrecognized_role",
        18: "secret_detected",
        19: "pii_detected",
    }
    assert "[masked credential: AWS Access Key]" in entries[13]["raw"]
    assert "Where is order" not in entries[13]["raw"] and "why is sign-in refused?" in entries[13]["raw"]
    assert "[masked credential: Private Key]" in entries[14]["raw"]
    assert "[masked credential: Secret API Key (sk-...)]" in entries[15]["raw"]
    assert "[masked credential: Secret API Key (sk-...)]" in entries[16]["raw"]  # not JSON: masked as text
    assert "[masked credential: AWS Access Key]" in entries[17]["raw"]
    assert "[email]" in entries[19]["raw"]
    assert entries[13]["detail"].startswith(
        "contains what looks like a credential (AWS Access Key) in messages["
    )
    # Everything else of a quarantined record is as it was: where it came from, why, what it duplicates.
    assert (
        entries[13]["source"] == "part.jsonl" and entries[13]["first_line"] == entries[13]["last_line"] == 13
    )
    clean = export.build_dataset(frame, config(export={"general_mix_fraction": 0.0}, dedupe={"pii": "allow"}))
    assert "[email]" not in b"".join(clean.quarantine_lines).decode()  # dedupe.pii: allow keeps PII as is


def test_a_large_quarantine_made_in_a_second_process_is_the_same_bytes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = config(export={"general_mix_fraction": 0.0}, dedupe={"pii": "quarantine"})
    # Every chat twice: as many exact duplicates as the quarantine's second process wants, and more.
    chats = [chat(i) for i in range(export.QUARANTINE_BESIDE_RECORDS + 100)]
    frame = dedupe.dedupe(prepared([*with_secrets(), *chats, *chats], cfg), [], cfg.dedupe)
    examples = frame[records.EXAMPLE].to_numpy(dtype=object, copy=True)
    assert records.kept_mask(frame).iloc[60]
    examples[60] = {**examples[60], "n": 2**70}  # kept, but JSON cannot represent it
    frame[records.EXAMPLE] = pd.Series(examples, index=frame.index, dtype=object)
    # As the engines' screen leaves it: training lines and raw texts in a store.
    packed, texts = text_store.pack(export.with_training_lines(frame))
    assert (~records.kept_mask(packed)).sum() >= export.QUARANTINE_BESIDE_RECORDS

    here = export.build_dataset(packed, cfg, texts=texts)
    with caplog.at_level(logging.INFO, logger="tuneline.tasks.export"):
        beside = export.build_dataset(packed, cfg, texts=texts, quarantine_beside=True)
    made = [r.getMessage() for r in caplog.records if "beside the flow's" in r.getMessage()]
    assert len(made) == 1 and made[0].startswith(
        f"export: the quarantine's {beside.counts['quarantined']} lines"
    )
    assert int(made[0].split("process ")[1].split(",")[0]) != os.getpid()
    assert beside.counts == here.counts and beside.counts["quarantined_by_reason"]["data_type"] == 1
    assert beside.quarantine_lines == here.quarantine_lines
    assert beside.train_lines == here.train_lines and beside.validation_lines == here.validation_lines
    assert beside.dataset_hash == here.dataset_hash and beside.files == here.files
    body = b"".join(beside.quarantine_lines).decode()
    assert all(secret not in body for secret in (*SECRETS, "ana@example.com"))
    assert packed[records.REASON].isna().iloc[60]  # the caller's frame is left as it is
