"""The prepare flow end to end: the real demo data, the real config, a real Prefect server, MLflow in a
temp dir; the command's exit codes; and the input == kept + quarantined invariant on generated bad input."""

from __future__ import annotations

import csv as csv_module
import hashlib
import io
import ipaddress
import json
import logging
import re
import socket
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tuneline import formats, records, tracking
from tuneline.cli import app
from tuneline.config import DEFAULT_CONFIG, load_config
from tuneline.flows.prepare import PrepareFailed, prepare
from tuneline.paths import resolve
from tuneline.tasks import dedupe, export, ingest, quality, validate

DATA_DIR = Path(__file__).resolve().parents[2] / "data"  # the repository's demo data


ANSWER_KEY: list[dict[str, Any]] = json.loads((DATA_DIR / "planted_defects.json").read_text())
DEMO_AS_OF = max(p.name.removeprefix("dt=") for p in (DATA_DIR / "raw" / "support").glob("dt=*"))
runner = CliRunner()


def write_config(folder: Path, **sections: dict[str, Any]) -> Path:
    """configs/local.yaml with MLflow in `folder` and `sections` merged on top."""
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    document["tracking"] = {
        "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
        "artifact_location": str(folder / "mlartifacts"),
        "experiment": "prepare-tests",
    }
    for section, values in sections.items():
        document[section] = {**document.get(section, {}), **values}
    path = folder / f"config-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


class NetworkGuard:
    """Records every connection attempt to a non-loopback address (and refuses it)."""

    def __init__(self) -> None:
        self.attempts: list[Any] = []
        self._connect = socket.socket.connect

    def __enter__(self) -> NetworkGuard:
        guard = self

        def connect(sock: socket.socket, address: Any) -> Any:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                host = address[0]
                try:
                    loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
                except ValueError:
                    loopback = False
                if not loopback:
                    guard.attempts.append(address)
                    raise OSError(f"tests must not reach the network: {address}")
            return guard._connect(sock, address)

        socket.socket.connect = connect  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        socket.socket.connect = self._connect  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MLflow store for the module's runs (a fresh SQLite store spends seconds creating its tables)."""
    return tmp_path_factory.mktemp("mlflow")


def mlflow_run_id(stdout: str) -> str:
    found = re.search(r"MLflow run: (\w+)", stdout)
    assert found, stdout
    return found.group(1)


@pytest.fixture(scope="module")
def demo(
    prefect_server: None, store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """`tuneline prepare` on the demo data, once for the module, with the network off."""
    folder = tmp_path_factory.mktemp("demo")
    config = write_config(store)
    out = folder / "out"
    with NetworkGuard() as guard:
        result = runner.invoke(
            app, ["prepare", "--config", str(config), "--as-of", DEMO_AS_OF, "--out", str(out)]
        )
    yield {"result": result, "out": out, "config": config, "network": guard.attempts}


def quarantined(out: Path) -> dict[tuple[str, int], dict[str, Any]]:
    entries = [json.loads(line) for line in (out / export.QUARANTINE_FILE).read_text().splitlines()]
    return {(e["source"], e["line"]): e for e in entries}


def demo_records() -> Any:
    """The demo partitions as ingest reads them (record ids, raw lines) for the configured sources."""
    config = load_config()
    selection = ingest.select_files(
        config.data.sources, date.fromisoformat(DEMO_AS_OF), config.data.lookback_days
    )
    return ingest.read_files(selection.files, config.model.system_prompt)


def test_demo_run_succeeds_offline_and_prints_a_summary(demo: dict[str, Any]) -> None:
    result = demo["result"]
    assert result.exit_code == 0, result.output
    assert demo["network"] == []
    manifest = json.loads((demo["out"] / export.MANIFEST_FILE).read_text())
    assert f"dataset hash: {manifest['dataset_hash']}" in result.stdout
    assert f"{manifest['counts']['input_records']:,} in" in result.stdout
    assert "estimated training cost: $0.00" in result.stdout  # tuneline-tiny trains for free
    for reason in manifest["counts"]["quarantined_by_reason"]:
        assert reason in result.stdout


def test_each_planted_defect_lands_in_quarantine_with_its_reason(demo: dict[str, Any]) -> None:
    found = quarantined(demo["out"])
    ids = {
        (s, int(n)): r
        for s, n, r in zip(*(demo_records()[c] for c in ("source", "line", "record_id")), strict=True)
    }
    planted = [e for e in ANSWER_KEY if e["reason"] is not None]
    assert {k["reason"] for k in planted} >= {
        "invalid_json",
        "invalid_encoding",
        "secret_detected",
        "eval_leakage",
    }
    for entry in planted:
        where = (entry["source"], entry["line"])
        assert where in found, f"{entry['kind']} at {where} was not quarantined ({entry['note']})"
        got = found[where]
        assert got["reason"] == entry["reason"], (entry, got)
        assert got["detail"], got
        if entry["duplicate_of"]:
            target = entry["duplicate_of"]
            assert got["duplicate_of"] == ids[(target["source"], target["line"])], (entry, got)
    # Nothing else is quarantined: every record outside the answer key is clean.
    assert set(found) == {(e["source"], e["line"]) for e in planted}


def test_each_clean_record_lands_in_train_or_validation(demo: dict[str, Any]) -> None:
    config = load_config()
    frame = validate.validate(demo_records(), config.model, config.validation)
    exported = set((demo["out"] / export.TRAIN_FILE).read_bytes().splitlines(keepends=True))
    exported |= set((demo["out"] / export.VALIDATION_FILE).read_bytes().splitlines(keepends=True))
    quarantine = quarantined(demo["out"])
    pii = {(e["source"], e["line"]) for e in ANSWER_KEY if e["kind"] == "pii"}
    kept = [row for row in frame.itertuples() if (row.source, row.line) not in quarantine]
    assert len(kept) > 600
    for row in kept:
        line = export.canonical_line(row.example)
        if (row.source, row.line) in pii:
            assert line not in exported  # exported with its email or phone number redacted
        else:
            assert line in exported, f"line {row.line} of {row.source} is neither exported nor quarantined"
    manifest = json.loads((demo["out"] / export.MANIFEST_FILE).read_text())
    assert manifest["counts"]["kept"] == len(kept)
    redacted = [x for x in exported if b"[email]" in x or b"[phone]" in x]
    assert len(redacted) >= len(pii)


def test_manifest_invariant_and_hash(demo: dict[str, Any]) -> None:
    out = demo["out"]
    manifest = json.loads((out / export.MANIFEST_FILE).read_text())
    counts = manifest["counts"]
    assert counts["input_records"] == len(demo_records()) == counts["kept"] + counts["quarantined"]
    assert sum(counts["quarantined_by_reason"].values()) == counts["quarantined"]
    assert counts["kept"] == counts["train"] - counts["general_mixed"] + counts["validation"]
    assert counts["general_mixed"] > 0 and counts["validation"] > 0
    train, valid = (out / export.TRAIN_FILE).read_bytes(), (out / export.VALIDATION_FILE).read_bytes()
    assert manifest["dataset_hash"] == hashlib.sha256(train + b"\0" + valid).hexdigest()
    assert manifest["config_hash"] == load_config(demo["config"]).config_hash()
    assert manifest["as_of"] == DEMO_AS_OF and len(manifest["partitions"]) == 7
    assert [s["name"] for s in manifest["sources"]] == ["support-chat", "support-csv"]
    assert manifest["tokens"]["max_example"] <= manifest["tokens"]["context_limit"] == 512
    assert manifest["published"] is True and manifest["problems"] == []
    count, issue = formats.check_training_file(train.splitlines())
    assert issue is None and count == counts["train"]
    page = (out / export.REPORT_FILE).read_text()
    assert "Data quality PASSED" in page and "expect_column_values_to_be_unique" in page


def test_the_run_is_logged_to_mlflow_and_tagged_with_the_flow_run(demo: dict[str, Any]) -> None:
    config = load_config(demo["config"])
    manifest = json.loads((demo["out"] / export.MANIFEST_FILE).read_text())
    run_id = mlflow_run_id(demo["result"].stdout)
    run = tracking.client(config.tracking).get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["config_hash"] == manifest["config_hash"] and params["as_of"] == DEMO_AS_OF
    assert "support-chat=data/raw/support/dt=*/*.jsonl" in params["sources"]
    metrics = run.data.metrics
    assert metrics["counts.kept"] == manifest["counts"]["kept"]
    assert (
        metrics["counts.quarantined_by_reason.exact_duplicate"]
        == manifest["counts"]["quarantined_by_reason"]["exact_duplicate"]
    )
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == manifest["dataset_hash"][:36]  # MLflow keeps 36 characters
    assert manifest["dataset_hash"] in dataset_input.dataset.profile
    # The training set as an MLflow dataset: its source the raw partitions, its schema the example's
    # fields, its profile the counts by reason and the token statistics; the quarantine as a table.
    dataset = dataset_input.dataset
    sources = ", ".join(str(resolve(source.uri)) for source in config.data.sources)
    assert json.loads(dataset.source)["uri"] == sources and "data/raw/support/dt=*/*.jsonl" in sources
    columns = [c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]]
    assert columns == ["prompt", "answer", "turns", "messages"]
    profile = json.loads(dataset.profile)
    assert profile["num_rows"] == manifest["counts"]["train"]
    assert profile["counts"]["quarantined_by_reason"] == manifest["counts"]["quarantined_by_reason"]
    assert profile["tokens"]["p95_example"] == manifest["tokens"]["p95_example"]
    assert not any(key.startswith("tokens.") and key != "tokens.train_total" for key in metrics)
    table = json.loads(
        tracking.download_artifact(
            config.tracking, run_id, "prepare/quarantine_table.json", demo["out"]
        ).read_text()
    )
    assert table["columns"][:2] == ["reason", "detail"]
    assert len(table["data"]) == manifest["counts"]["quarantined"]
    assert run.data.tags["tuneline.dataset_hash"] == manifest["dataset_hash"]
    artifacts = tracking.list_artifacts(config.tracking, run_id)
    assert {"prepare/manifest.json", "prepare/quarantine.jsonl", "prepare/report.html"} <= set(artifacts)

    from prefect.client.orchestration import get_client

    flow_run_id = run.data.tags[tracking.FLOW_RUN_ID_TAG]
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(uuid.UUID(flow_run_id))
    assert flow_run.name == run.data.tags[tracking.FLOW_RUN_NAME_TAG]
    assert flow_run.state is not None and flow_run.state.is_completed()


def test_a_second_run_gives_the_same_bytes(demo: dict[str, Any], tmp_path: Path) -> None:
    result = prepare(
        config_path=str(demo["config"]), as_of=date.fromisoformat(DEMO_AS_OF), out_dir=str(tmp_path)
    )
    first = json.loads((demo["out"] / export.MANIFEST_FILE).read_text())
    assert result.published and result.dataset_hash == first["dataset_hash"]
    for name in (export.TRAIN_FILE, export.VALIDATION_FILE, export.QUARANTINE_FILE):
        assert (tmp_path / name).read_bytes() == (demo["out"] / name).read_bytes()


def test_input_replaces_the_configured_sources(demo: dict[str, Any], tmp_path: Path) -> None:
    csv = next((DATA_DIR / "raw" / "support").glob("dt=*/*.csv"))
    day = csv.parent.name.removeprefix("dt=")
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["prepare", "-c", str(demo["config"]), "--as-of", day, "-i", str(csv), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / export.MANIFEST_FILE).read_text())
    assert [s["uri"] for s in manifest["sources"]] == [str(csv)]
    rows = len(list(csv_module.reader(csv.open(newline="")))) - 1  # quoted fields span lines
    assert manifest["counts"]["input_records"] == rows
    # The CSV has no mapping of its own: the configured source's mapping fits its columns.
    assert "csv_mapping" not in manifest["counts"]["quarantined_by_reason"]
    system = {"role": "system", "content": load_config().model.system_prompt}
    lines = [
        *(out / export.TRAIN_FILE).read_text().splitlines(),
        *(out / export.VALIDATION_FILE).read_text().splitlines(),
    ]
    assert sum(json.loads(line)["messages"][0] == system for line in lines) >= manifest["counts"]["kept"] > 0


def small_input(folder: Path, n: int) -> Path:
    path = folder / "ad-hoc.jsonl"
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Case {i}: my refund {i * 13} is late"},
                    {"role": "assistant", "content": f"Billing: refund {i * 13} is on its way."},
                ]
            }
        )
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
PROJECT_KEY = "sk-proj-" + "Zq9x" * 12
KEY_BODY = "MIIEowIBAAKCAQEAx7Kq9ZtHc2S0vPq4Y5mWl3kR8nJb"


def test_no_secret_leaves_the_prepare_folder(prefect_server: None, store: Path, tmp_path: Path) -> None:
    """Records holding credentials are quarantined; what goes to MLflow and Prefect (quarantine.jsonl,
    manifest, report, params, tags, the markdown summary) never holds one, and neither does the local
    quarantine file: it says where each record came from and which detector fired."""
    path = small_input(tmp_path, 14)
    secret_lines = [
        {
            "messages": [
                {"role": "user", "content": f"my key {AWS_KEY} fails"},
                {"role": "assistant", "content": "ok"},
            ]
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": f"-----BEGIN RSA PRIVATE KEY-----\n{KEY_BODY}\n-----END RSA PRIVATE KEY-----",
                },
                {"role": "assistant", "content": "ok"},
            ]
        },
        {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
            "key": PROJECT_KEY,
        },
    ]
    with path.open("a") as handle:
        handle.write("".join(json.dumps(line) + "\n" for line in secret_lines))
        handle.write('{"messages": [{"role": "user", "content": "' + PROJECT_KEY + '"\n')  # not JSON
    config = write_config(store)
    result = prepare(config_path=str(config), inputs=[str(path)], out_dir=str(tmp_path / "out"))
    assert result.published and result.mlflow_run_id
    secrets = (AWS_KEY, PROJECT_KEY, KEY_BODY)
    local = result.quarantine_file.read_text()
    assert len(local.splitlines()) == 4 and all(s not in local for s in secrets)
    assert "[masked credential: AWS Access Key]" in local and "[masked credential: Private Key]" in local
    cfg = load_config(config)
    run = tracking.read_run(cfg.tracking, result.mlflow_run_id)
    for value in [*run.params.values(), *run.tags.values()]:
        assert all(s not in value for s in secrets), value
    artifacts = tracking.list_artifacts(cfg.tracking, result.mlflow_run_id)
    assert "prepare/quarantine.jsonl" in artifacts
    logged = {
        artifact: tracking.download_artifact(cfg.tracking, result.mlflow_run_id, artifact, tmp_path / "dl")
        for artifact in artifacts
    }
    for artifact, downloaded in logged.items():
        assert all(s not in downloaded.read_text() for s in secrets), artifact
    assert logged["prepare/quarantine.jsonl"].read_text() == local

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(run.tags[tracking.FLOW_RUN_ID_TAG])])
            )
        )
    assert found and all(s not in str(a.data) for a in found for s in secrets)


def test_a_failing_quality_check_exits_1_and_publishes_nothing(
    prefect_server: None,
    store: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The check runs in a process of its own while export builds the dataset, as for a large batch (a
    # batch this small is otherwise checked first, in the flow's process: the other tests here).
    monkeypatch.setattr(quality, "QUALITY_BESIDE_RECORDS", 1)
    config = write_config(store, execution={"flow_threads": 2})
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="tuneline.tasks.quality"):
        result = runner.invoke(
            app, ["prepare", "-c", str(config), "--input", str(small_input(tmp_path, 4)), "--out", str(out)]
        )
    assert "quality: checked in process" in caplog.text
    assert result.exit_code == 1, result.output
    assert "at least 10 examples kept" in result.stderr and "observed 4" in result.stderr
    assert not (out / export.TRAIN_FILE).exists() and (out / export.REPORT_FILE).exists()
    assert "Data quality FAILED" in (out / export.REPORT_FILE).read_text()
    cfg = load_config(config)
    assert tracking.read_run(cfg.tracking, mlflow_run_id(result.stdout)).status == "FAILED"


def test_the_cost_cap_stops_the_run(prefect_server: None, store: Path, tmp_path: Path) -> None:
    config = write_config(store, model={"base": "gpt-4.1-mini"}, cost={"max_estimated_cost_usd": 0.0001})
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["prepare", "-c", str(config), "-i", str(small_input(tmp_path, 12)), "-o", str(out)]
    )
    assert result.exit_code == 1, result.output
    assert "cost.max_estimated_cost_usd = $0.00" in result.stderr
    manifest = json.loads((out / export.MANIFEST_FILE).read_text())
    assert manifest["cost"]["within_cap"] is False and manifest["published"] is False
    # The flow itself fails, so nothing downstream can upload.
    with pytest.raises(PrepareFailed, match="cost"):
        prepare(
            config_path=str(config), inputs=[str(tmp_path / "ad-hoc.jsonl")], out_dir=str(tmp_path / "again")
        )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--as-of", "22/11/2026"], "--as-of: '22/11/2026' is not a date"),
        (["--input", "no/such/file-*.jsonl"], "--input no/such/file-*.jsonl: no such file"),
        (["--config", "no-such-config.yaml"], "config file not found"),
        (
            ["--as-of", "2030-01-01", "-i", "data/raw/support/dt=*/*.csv"],
            "outside the date window (2029-12-25, 2030-01-01]",
        ),
    ],
)
def test_usage_errors_exit_2(prefect_server: None, tmp_path: Path, args: list[str], expected: str) -> None:
    result = runner.invoke(app, ["prepare", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and expected in result.stderr, result.output


def test_config_errors_exit_2_naming_the_key(prefect_server: None, tmp_path: Path) -> None:
    bad = write_config(tmp_path, dedupe={"near_duplicate_treshold": 0.9})
    result = runner.invoke(app, ["prepare", "--config", str(bad), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "dedupe.near_duplicate_treshold: unknown key" in result.stderr
    no_eval = write_config(tmp_path, data={"eval_set": "data/eval/missing.jsonl"})
    result = runner.invoke(
        app, ["prepare", "-c", str(no_eval), "-i", str(small_input(tmp_path, 12)), "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "data.eval_set: data/eval/missing.jsonl not found" in result.stderr
    assert runner.invoke(app, ["prepare"]).exit_code == 2  # --out is required


# --- the invariant on generated bad input --------------------------------------------------------------

TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30
) | st.sampled_from(
    [
        "Billing: refund sent.",
        "ship it",
        "mail me at ana@example.com",
        "key sk-proj-" + "a1B2" * 12,
        "<|endoftext|>",
        "",
    ]
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "tool", "bot", ""]),
        "content": TEXT | st.none() | st.just([{"type": "text", "text": "hi"}]),
    },
    optional={"weight": st.sampled_from([0, 1, 2, "1"]), "mood": st.just("x")},
)
NEAR_VALID = st.builds(
    lambda q, a, extra: {
        "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}, *extra]
    },
    st.sampled_from(
        ["Where is my parcel?", "where is my parcel", "I want a refund", "Reset my password please now"]
    )
    | TEXT,
    st.sampled_from(["Shipping: on its way.", "Billing: refunded.", "Account: reset link sent."]) | TEXT,
    st.lists(MESSAGE, max_size=2),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | TEXT,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["messages", "prompt", "completion", "role", "x"]), inner, max_size=3
        )
    ),
    max_leaves=8,
)
LINE = (
    st.binary(max_size=40)
    | JSON.map(lambda v: json.dumps(v).encode())
    | NEAR_VALID.map(lambda v: json.dumps(v, ensure_ascii=False).encode())
    | st.builds(lambda p, c: json.dumps({"prompt": p, "completion": c}).encode(), TEXT, TEXT)
)
INVARIANT_CONFIG = load_config(
    overrides={"validation.context_limits": {"tuneline-tiny": 48}, "export.general_mix_fraction": 0.0}
)
EVAL = [
    {
        "messages": [
            {"role": "user", "content": "I want a refund"},
            {"role": "assistant", "content": "Billing: refunded."},
        ]
    }
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LINE, max_size=25))
def test_every_record_ends_in_exactly_one_place(lines: list[bytes]) -> None:
    body = b"\n".join(lines) + b"\n"
    path = f"/invariant-{uuid.uuid4().hex}/part.jsonl"
    fs = fsspec.filesystem("memory")
    fs.pipe(path, body)
    try:
        frame = ingest.read_files(
            [ingest.InputFile("s", f"memory://{path}", path, "", "jsonl", None)], "System."
        )
    finally:
        fs.rm(path)
    physical = body.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    nonblank = [n for n, raw in enumerate(physical, start=1) if raw.removesuffix(b"\r").strip()]
    records_in_file = len(nonblank)
    # Per physical line: every non-blank line is exactly one record, named by its line number.
    assert frame[records.FIRST_LINE].tolist() == frame[records.LAST_LINE].tolist() == nonblank
    frame = validate.validate(frame, INVARIANT_CONFIG.model, INVARIANT_CONFIG.validation)
    frame = dedupe.dedupe(frame, EVAL, INVARIANT_CONFIG.dedupe)
    dataset = export.build_dataset(frame, INVARIANT_CONFIG)
    counts = dataset.counts
    assert counts["input_records"] == records_in_file == counts["kept"] + counts["quarantined"]
    assert (
        sum(counts["quarantined_by_reason"].values())
        == counts["quarantined"]
        == len(dataset.quarantine_lines)
    )
    assert counts["kept"] == counts["train"] + counts["validation"]
    assert set(counts["quarantined_by_reason"]) <= records.KNOWN_REASONS
    quarantined_ids = [json.loads(line)["record_id"] for line in dataset.quarantine_lines]
    assert len(set(quarantined_ids)) == len(quarantined_ids)
    assert set(quarantined_ids) == set(frame.loc[~records.kept_mask(frame), records.RECORD_ID])
    for line in dataset.train_lines + dataset.validation_lines:
        example = json.loads(line)
        assert formats.check_example(example) is None
        assert export.canonical_line(example) == line


# --- the invariant per physical line, on generated CSVs with broken quotes ------------------------------

CSV_COLUMNS = {2: ["user", "assistant"], 3: ["ticket", "user", "assistant"]}


def csv_field(column: str, row: int, shape: str) -> str:
    """A field of row `row`: every text names its row, so a merged example shows two row names."""
    word = {
        "ticket": f"T{row}",
        "user": f"row{row} asks where parcel {row * 7} is",
        "assistant": f"row{row} Shipping: parcel {row * 7} is on its way",
    }[column]
    if shape == "comma":
        return f'"{word}, today"'
    if shape == "lines":
        return f'"{word}\nrow{row} writes a second line"'
    return word


@st.composite
def csv_files(draw: st.DrawFn, *, broken: bool) -> tuple[str, list[list[str]]]:
    """CSV text (header on line 1) and each data row's fields; with `broken`, quotes dropped anywhere."""
    columns = CSV_COLUMNS[draw(st.sampled_from(sorted(CSV_COLUMNS)))]
    shapes = st.sampled_from(["plain", "plain", "comma", "lines"])
    rows = [[csv_field(c, i, draw(shapes)) for c in columns] for i in range(draw(st.integers(1, 14)))]
    texts = [",".join(fields) for fields in rows]
    if broken:
        # Stray quotes where they do harm (opening or closing a field) or anywhere at all.
        for _ in range(draw(st.integers(1, 4))):
            row = draw(st.integers(0, len(texts) - 1))
            commas = [i for i, c in enumerate(texts[row]) if c == ","]
            places = {
                "opens a field": [0, *(i + 1 for i in commas)],
                "closes a field": [*commas, len(texts[row])],
                "anywhere": list(range(len(texts[row]) + 1)),
            }
            at = draw(st.sampled_from(places[draw(st.sampled_from(sorted(places)))]))
            texts[row] = texts[row][:at] + '"' + texts[row][at:]
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    lines = [",".join(columns)]
    for text in texts:
        lines += [""] * draw(st.integers(0, 1))  # a blank line now and then
        lines.append(text.replace("\n", newline))
    values = [[f.strip('"').replace("\n", newline) for f in fields] for fields in rows]
    return newline.join(lines) + newline * draw(st.integers(0, 1)), values


def ingest_csv(text: str) -> pd.DataFrame:
    path = f"/csv-invariant-{uuid.uuid4().hex}/crm.csv"
    fs = fsspec.filesystem("memory")
    fs.pipe(path, text.encode())
    try:
        return ingest.read_files(
            [ingest.InputFile("s", f"memory://{path}", path, "", "csv", None)], "System."
        )
    finally:
        fs.rm(path)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(csv_files(broken=True))
def test_every_physical_csv_line_ends_in_exactly_one_place(generated: tuple[str, list[list[str]]]) -> None:
    text, _ = generated
    frame = ingest_csv(text)
    lines = list(io.StringIO(text, newline=""))  # physical lines as csv reads them
    covered = [
        n
        for a, b in zip(frame[records.FIRST_LINE], frame[records.LAST_LINE], strict=True)
        for n in range(a, b + 1)
    ]
    assert len(covered) == len(set(covered)), "a physical line is in two records"
    assert 1 not in covered and all(1 <= n <= len(lines) for n in covered)  # line 1 is the header
    nonblank = {n for n, line in enumerate(lines, start=1) if line.strip()}
    assert nonblank - {1} <= set(covered), "a physical line is in no record"
    # A broken region never yields a merged example: a kept example holds one row's words, but for the
    # one merge CSV cannot tell from a message with line breaks (tuneline/csv_rows.py): stray quotes
    # opening a row's last field and closing a later row's last field, which only that field shows.
    for example in frame.loc[records.kept_mask(frame), records.EXAMPLE]:
        *fields, last = (m["content"].replace('"', "") for m in example["messages"][1:])
        rows = set(re.findall(r"row(\d+)", " ".join(fields)))
        assert len(rows) == 1, example
        assert min(int(n) for n in re.findall(r"row(\d+)", last)) == int(*rows), example
    frame = validate.validate(frame, INVARIANT_CONFIG.model, INVARIANT_CONFIG.validation)
    frame = dedupe.dedupe(frame, EVAL, INVARIANT_CONFIG.dedupe)
    counts = export.build_dataset(frame, INVARIANT_CONFIG).counts
    assert counts["input_records"] == len(frame) == counts["kept"] + counts["quarantined"]
    assert sum(counts["quarantined_by_reason"].values()) == counts["quarantined"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(csv_files(broken=False))
def test_well_quoted_csv_rows_are_read_whole(generated: tuple[str, list[list[str]]]) -> None:
    text, values = generated
    frame = ingest_csv(text)
    assert frame[records.REASON].isna().all()
    for example, fields in zip(frame[records.EXAMPLE], values, strict=True):
        assert [m["content"] for m in example["messages"][1:]] == fields[-2:]
