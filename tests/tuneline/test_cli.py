"""`tuneline ui`: the MLflow UI on the configured store, on loopback, stopped cleanly."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from typer.testing import CliRunner

from tuneline import tracking
from tuneline.cli import app
from tuneline.config import load_config

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
