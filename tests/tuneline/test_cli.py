"""`tuneline ui`: the MLflow UI on the configured store, on loopback, stopped cleanly. What a newcomer
meets: the problems found before any work (no data in the date window, a bad date, no provider key, an
unreachable provider, no project folder) in one line and exit 2; an expected failure without a
traceback."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from typer.testing import CliRunner

from tuneline import tracking
from tuneline.cli import _WithoutTraceback, app, expected_failures
from tuneline.config import load_config

# Imported here, not by the first command: importing prefect configures logging, which would drop
# the handler caplog put on the root logger.
from tuneline.flows.prepare import PrepareFailed
from tuneline.paths import PROJECT_ENV
from tuneline.provider import ProviderError

TUNELINE = str(Path(sys.executable).with_name("tuneline"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(path: Path, tracking_section: dict[str, str]) -> Path:
    document = {
        "data": {"sources": [{"name": "support", "uri": str(path.parent / "raw")}]},
        "tracking": tracking_section,
    }
    path.write_text(yaml.safe_dump(document))
    return path


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_ui_serves_the_configured_store_on_loopback_and_stops_with_its_server(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "config.yaml",
        {
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "artifact_location": str(tmp_path / "mlartifacts"),
            "experiment": "ui-test",
        },
    )
    settings = load_config(config).tracking
    run = tracking.RunLog.start(settings, flow="test", name="a run to find")
    run.finish()
    run_id = run.run_id
    port = free_port()
    log = tmp_path / "ui.log"
    with log.open("wb") as out:
        ui = subprocess.Popen(
            [TUNELINE, "ui", "--config", str(config), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240  # a loaded 2-core machine is slow to import mlflow
        healthy = False
        while time.monotonic() < deadline and not healthy:
            assert ui.poll() is None, log.read_text()
            try:
                healthy = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            except httpx.TransportError:
                time.sleep(0.25)
        assert healthy, f"no MLflow UI on port {port} within 240s\n{log.read_text()}"
        started = psutil.Process(ui.pid).children(recursive=True)

        experiment = tracking.client(settings).get_experiment_by_name("ui-test")
        found = httpx.post(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
            json={"experiment_ids": [experiment.experiment_id]},
            timeout=10,
        ).json()
        assert [r["info"]["run_id"] for r in found["runs"]] == [run_id]
        assert {
            c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN"
        } == {"127.0.0.1"}
        said = log.read_text()
        assert f"MLflow UI: http://127.0.0.1:{port}" in said and "prefect server start" in said

        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=60) == 0, log.read_text()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (listening(port) or any(p.is_running() for p in started)):
            time.sleep(0.25)
        assert not listening(port)
        assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if ui.poll() is None:
            ui.kill()
        for process in started:
            if process.is_running():
                process.kill()


def test_ui_with_a_tracking_server_points_there_and_starts_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", {"tracking_uri": "http://mlflow.internal:5000/"})
    outcome = CliRunner().invoke(app, ["ui", "--config", str(config)])
    assert outcome.exit_code == 0
    assert "MLflow UI: http://mlflow.internal:5000 (served by the tracking server)" in outcome.output
    assert "prefect server start" in outcome.output


@pytest.mark.parametrize("port", ["0", "70000"])
def test_ui_refuses_a_port_out_of_range(port: str) -> None:
    assert CliRunner().invoke(app, ["ui", "--port", port]).exit_code == 2


# --------------------------------------------------------------------------------------------------
# What a newcomer meets: one line and exit 2 for what can be checked before any work, no traceback
# for an expected failure.

runner = CliRunner()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    return free_port()


def one_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def test_no_partition_in_the_window_says_so_in_one_line_with_the_newest_partition(
    tmp_path: Path, support_project: Any
) -> None:
    config = support_project(tmp_path, {"2025-01-02": 12, "2025-01-03": 12})
    today = date.today()
    for args in (
        ["run", "--config", str(config)],
        ["prepare", "--config", str(config), "--out", str(tmp_path / "x")],
    ):
        outcome = runner.invoke(app, args)
        assert outcome.exit_code == 2, outcome.output
        line = one_line(outcome.output)
        assert f"({today - timedelta(days=7)}, {today}]" in line
        assert "the newest partition found is 2025-01-03" in line and "--as-of 2025-01-03" in line
    assert not (tmp_path / "x").exists() and not (tmp_path / "mlflow.db").exists()  # no work was done


def test_an_impossible_date_in_the_config_is_one_line_naming_the_key(
    tmp_path: Path, support_project: Any
) -> None:
    config = support_project(tmp_path, {"2025-01-02": 12})
    config.write_text(config.read_text().replace("lookback_days: 7", "lookback_days: 7\n  as_of: 2026-13-45"))
    outcome = runner.invoke(app, ["run", "--config", str(config)])
    assert outcome.exit_code == 2, outcome.output
    line = one_line(outcome.output)
    assert "data.as_of" in line and "2026-13-45" in line and "YYYY-MM-DD" in line


def test_a_missing_provider_key_is_found_before_any_work(
    tmp_path: Path, support_project: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = support_project(
        tmp_path,
        {"2025-01-02": 12},
        provider={"kind": "openai", "base_url": f"http://127.0.0.1:{closed_port()}/v1"},
        training={"runs_dir": str(tmp_path / "runs")},
    )
    outcome = runner.invoke(app, ["run", "--config", str(config), "--as-of", "2025-01-02"])
    assert outcome.exit_code == 2, outcome.output
    assert "set the environment variable OPENAI_API_KEY" in one_line(outcome.output)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_an_unreachable_provider_names_the_configured_host_and_fails_fast(
    tmp_path: Path, support_project: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-never-sent-anywhere-0123456789")
    port = closed_port()
    config = support_project(
        tmp_path,
        {"2025-01-02": 12},
        provider={"kind": "openai", "base_url": f"http://127.0.0.1:{port}/v1"},
        training={"runs_dir": str(tmp_path / "runs")},
    )
    started = time.monotonic()
    outcome = runner.invoke(app, ["run", "--config", str(config), "--as-of", "2025-01-02"])
    elapsed = time.monotonic() - started
    assert outcome.exit_code == 2, outcome.output
    line = one_line(outcome.output)
    assert (
        f"http://127.0.0.1:{port}/v1" in line and "connection refused" in line and "provider.base_url" in line
    )
    assert "api.openai.com" not in line
    assert elapsed < 15, f"{elapsed:.1f}s to report a refused connection"
    assert not (tmp_path / "runs").exists()


def test_the_project_folder_comes_from_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROJECT_ENV, os.environ.get(PROJECT_ENV, str(Path.cwd())))  # restored afterwards
    project = tmp_path / "acme"
    (project / "configs").mkdir(parents=True)
    (project / "data" / "raw" / "dt=2025-02-03").mkdir(parents=True)
    (project / "data" / "raw" / "dt=2025-02-03" / "part-0.jsonl").write_text("{}\n")
    (project / "configs" / "local.yaml").write_text(
        yaml.safe_dump({"data": {"sources": [{"name": "support", "uri": "data/raw"}]}})
    )
    outcome = runner.invoke(app, ["--project", str(project), "run"])
    assert outcome.exit_code == 2, outcome.output
    assert "the newest partition found is 2025-02-03" in one_line(outcome.output)
    assert os.environ[PROJECT_ENV] == str(project.resolve())
    empty = tmp_path / "empty"
    empty.mkdir()
    outcome = runner.invoke(app, ["--project", str(empty), "run"])
    assert outcome.exit_code == 2
    assert "no configs/local.yaml in the project folder" in one_line(outcome.output)
    outcome = runner.invoke(app, ["--project", str(tmp_path / "nowhere"), "run"])
    assert outcome.exit_code == 2 and "--project" in one_line(outcome.output)


def test_a_failed_gate_is_reported_without_a_traceback(
    prefect_server: None, tmp_path: Path, support_project: Any, caplog: pytest.LogCaptureFixture
) -> None:
    config = support_project(tmp_path, {"2025-01-02": 12}, validation={"min_examples": 1000})
    outcome = runner.invoke(
        app, ["prepare", "--config", str(config), "--as-of", "2025-01-02", "--out", str(tmp_path / "x")]
    )
    assert outcome.exit_code == 1, outcome.output
    assert "stopped:" in outcome.output and "Traceback" not in outcome.output
    failures = [r for r in caplog.records if "Encountered exception" in r.getMessage()]
    assert failures and all(r.exc_info is None for r in failures), failures
    flow_runs = logging.getLogger("prefect.flow_runs")
    assert not [f for f in flow_runs.filters if isinstance(f, _WithoutTraceback)]  # gone with the command


def test_only_expected_failures_lose_their_traceback() -> None:
    keep = _WithoutTraceback((PrepareFailed,))
    for error, stripped in ((RuntimeError("a bug"), False), (ProviderError("refused"), False)):
        record = logging.LogRecord(
            "prefect.flow_runs", logging.ERROR, __file__, 1, "x", (), (type(error), error, None)
        )
        assert keep.filter(record) and (record.exc_info is None) == stripped
    assert ProviderError in expected_failures()


def test_monitor_usage_and_config_errors_are_one_line(tmp_path: Path, support_project: Any) -> None:
    config = support_project(tmp_path, {"2025-01-02": 12})
    outcome = runner.invoke(app, ["monitor", "--config", str(config), "--as-of", "2026-13-45"])
    assert outcome.exit_code == 2 and "--as-of" in one_line(outcome.output), outcome.output
    config.write_text(config.read_text() + "promotion:\n  rollout: canary\n")
    outcome = runner.invoke(app, ["monitor", "--config", str(config)])
    assert outcome.exit_code == 2, outcome.output
    line = one_line(outcome.output)
    assert "promotion.rollout" in line and "'direct'" in line and "'ab'" in line


def test_monitor_without_a_challenger_decides_nothing(
    prefect_server: None, tmp_path: Path, support_project: Any
) -> None:
    config = support_project(tmp_path, {"2025-01-02": 12})
    outcome = runner.invoke(app, ["monitor", "--config", str(config), "--no-harvest"])
    assert outcome.exit_code == 0, outcome.output
    assert "support-assistant: no challenger, no A/B test to decide" in outcome.output
