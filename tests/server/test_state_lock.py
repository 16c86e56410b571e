"""One server per state directory (issue #14): a second `tuneline serve` refuses to start, naming the
holder; a pipeline run waits for another run's embedded server instead of taking its jobs over, and
is told at once about a server started by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tuneline.server.launcher import ServerStartError, free_port, start_server
from tuneline.server.state_lock import holder_of


def serve(state: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tuneline.cli", "serve", "--state-dir", str(state), *extra]


def test_a_second_serve_on_a_held_state_dir_refuses_naming_the_holder(
    tmp_path: Path, seeded_state: Any
) -> None:
    state = seeded_state(tmp_path)
    with start_server(state, api_key="k") as first:
        lock = json.loads((state / "server.lock").read_text(encoding="utf-8"))
        assert lock == {"pid": first.pid, "port": first.port, "embedded": True}
        env = {k: v for k, v in os.environ.items() if k != "TUNELINE_API_KEY"}
        second = subprocess.run(
            serve(state, "--port", str(free_port())), env=env, capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 2
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and str(state) in lines[0], second.stderr
        assert "Traceback" not in second.stderr
        assert httpx.get(f"{first.base_url}/models", headers={"Authorization": "Bearer k"}).is_success
    assert holder_of(state) is None  # released when the server ended


def test_a_run_waits_for_another_runs_server_and_is_told_about_a_hand_started_one(
    tmp_path: Path, seeded_state: Any
) -> None:
    state = seeded_state(tmp_path / "shared")
    second: dict[str, Any] = {}

    def later_run() -> None:
        try:
            second["server"] = start_server(state, api_key="k2")
        except BaseException as exc:
            second["error"] = exc

    with start_server(state, api_key="k1") as first:
        waiting = threading.Thread(target=later_run)
        waiting.start()
        time.sleep(3)
        assert waiting.is_alive() and not second, second  # it waits: it has not taken the state dir over
        assert httpx.get(f"{first.base_url}/models", headers={"Authorization": "Bearer k1"}).is_success
    waiting.join(timeout=120)
    assert "error" not in second, second.get("error")
    with second["server"] as server:
        assert httpx.get(f"{server.base_url}/models", headers={"Authorization": "Bearer k2"}).is_success

    # A server started by hand is not waited for: the run is told how to use it instead.
    env = {k: v for k, v in os.environ.items() if k != "TUNELINE_API_KEY"}
    port = free_port()
    by_hand = subprocess.Popen(
        serve(state, "--port", str(port)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while holder_of(state) is None or holder_of(state).pid != by_hand.pid:  # type: ignore[union-attr]
            assert time.monotonic() < deadline and by_hand.poll() is None
            time.sleep(0.1)
        started = time.monotonic()
        try:
            start_server(state, api_key="k3")
            raise AssertionError("a run started a second server on a held state directory")
        except ServerStartError as exc:
            assert f"pid {by_hand.pid}" in str(exc) and f"http://127.0.0.1:{port}/v1" in str(exc)
        assert time.monotonic() - started < 10
    finally:
        by_hand.terminate()
        by_hand.wait(timeout=60)
