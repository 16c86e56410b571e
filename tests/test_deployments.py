"""prefect.yaml against a real Prefect server: `prefect deploy --all` from the project root, then a run of
the backfill deployment picked up and run by a real process worker (`prefect worker start --run-once`)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the repository


PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "tuneline-process"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    check, deadline_s: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None
):  # type: ignore[no-untyped-def]
    """Poll `check` until it returns something truthy, or fail after `deadline_s` (or when `process` dies)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(
                f"{what}: the process exited with {process.returncode}\n{log.read_text() if log else ''}"
            )
        found = check()
        if found:
            return found
        time.sleep(0.25)
    pytest.fail(f"{what}: not within {deadline_s:.0f}s\n{log.read_text()[-4000:] if log else ''}")


def stop(process: subprocess.Popen) -> None:
    """End a process group this test started: SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


@pytest.fixture
def prefect_api(tmp_path: Path) -> Iterator[tuple[dict[str, str], httpx.Client]]:
    """A real `prefect server start` on a free loopback port, its state in tmp_path; stopped afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        # --no-services: no scheduler, so the nightly schedule cannot put a run in this test's way.
        server = subprocess.Popen(
            [
                PREFECT,
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-ui",
                "--no-services",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        with httpx.Client(base_url=url, timeout=10) as api:

            def healthy() -> bool:
                try:
                    return api.get("/health").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(healthy, 240, "prefect server start", server, log)
            yield env, api
    finally:
        stop(server)


def prefect(env: dict[str, str], *args: str, timeout: float = 240) -> str:
    done = subprocess.run(
        [PREFECT, "--no-prompt", *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (
        f"prefect {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout + done.stderr


def deployments_by_name(api: httpx.Client) -> dict[str, dict]:
    found = api.post("/deployments/filter", json={"limit": 50})
    found.raise_for_status()
    return {d["name"]: d for d in found.json()}


def test_prefect_yaml_deploys_and_a_worker_runs_the_backfill_deployment(
    prefect_api: tuple[dict[str, str], httpx.Client], tmp_path: Path, support_project: Callable[..., Path]
) -> None:
    env, api = prefect_api
    config = support_project(tmp_path / "project", {"2026-11-01": 14, "2026-11-02": 14})

    prefect(env, "work-pool", "create", POOL, "--type", "process")
    prefect(env, "deploy", "--all", timeout=360)

    declared = {d["name"] for d in yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())["deployments"]}
    deployed = deployments_by_name(api)
    assert declared == {"nightly-retrain", "backfill", "rollback", "monitor"} == set(deployed)
    nightly = deployed["nightly-retrain"]
    [schedule] = nightly["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["schedule"]["timezone"] == "Europe/Berlin"
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert nightly["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    assert all(d["work_pool_name"] == POOL for d in deployed.values())
    assert deployed["backfill"]["schedules"] == []
    [hourly] = deployed["monitor"]["schedules"]
    assert hourly["schedule"]["cron"] == "15 * * * *" and hourly["active"]
    assert deployed["monitor"]["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    # The pull step runs flows from the checkout `prefect deploy` ran in.
    [pull] = deployed["backfill"]["pull_steps"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == str(PROJECT_ROOT)

    output = prefect(
        env,
        "deployment",
        "run",
        "backfill/backfill",
        "-p",
        "start=2026-11-01",
        "-p",
        "end=2026-11-02",
        "-p",
        "mode=prepare",
        "-p",
        f"config={config}",
    )
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert flow_run_id, output
    worker_log = tmp_path / "worker.log"
    with worker_log.open("wb") as out:
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", POOL, "--run-once"],
            env=env,
            cwd=tmp_path,  # the pull step, not the worker's folder, decides where the flow runs
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def finished() -> dict | None:
            run = api.get(f"/flow_runs/{flow_run_id.group(1)}").json()
            return run if run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} else None

        run = wait_until(finished, 420, "the backfill flow run", log=worker_log)
        worker.wait(timeout=60)
    finally:
        stop(worker)
    assert run["state"]["type"] == "COMPLETED", worker_log.read_text()[-6000:]

    # Its outputs: each date prepared under the configured work dir, and the run summary on the flow run.
    manifests = sorted((tmp_path / "project" / "backfill" / "prepared").glob("*/*/manifest.json"))
    assert [m.parts[-3] for m in manifests] == ["2026-11-01", "2026-11-02"]
    assert json.loads(manifests[1].read_text())["counts"]["input_records"] == 32
    artifacts = api.post(
        "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id.group(1)]}}}
    ).json()
    summary = next(a for a in artifacts if a["key"] == "backfill-summary")
    assert "| 2026-11-01 | prepared |" in summary["data"] and "| 2026-11-02 | prepared |" in summary["data"]
