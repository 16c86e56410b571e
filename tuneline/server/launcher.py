"""Start `tuneline serve` as a real subprocess and wait until it answers: used by the pipeline's
`provider: local` and by the tests.

    with start_server(state_dir, api_key="sk-local") as server:
        client = OpenAI(base_url=server.base_url, api_key=server.api_key)

The server's output goes to `<state_dir>/server.log`. Leaving the block stops the server (SIGTERM,
then SIGKILL after a grace period); jobs it was running resume when a server starts on the same
state directory again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import httpx

from tuneline.server.settings import API_KEY_ENV
from tuneline.server.state_lock import EMBEDDED_ENV, holder_of

log = logging.getLogger(__name__)


class ServerStartError(RuntimeError):
    """The server process exited or did not answer in time; the message holds its log's last lines."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A running `tuneline serve`: `base_url` (ending in /v1), `api_key`, `pid`, `log_path`."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        port: int,
        api_key: str | None,
        state_dir: Path,
        log_path: Path,
    ):
        self.process = process
        self.port = port
        # Without a key (loopback only) the server accepts any, but clients still need a non-empty one.
        self.api_key = api_key or "no-key"
        self.state_dir = state_dir
        self.log_path = log_path
        self.base_url = f"http://127.0.0.1:{port}/v1"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(
                self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
            )
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout_s: float) -> None:
        """Poll GET /v1/models until it answers 200; raise ServerStartError at the deadline or exit."""
        deadline = time.monotonic() + timeout_s
        headers = {"Authorization": f"Bearer {self.api_key}"}
        last_error = "no answer yet"
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise ServerStartError(
                        f"tuneline serve exited with code {self.process.returncode} before answering; "
                        f"last lines of {self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    response = client.get(f"{self.base_url}/models", headers=headers)
                    if response.status_code == 200:
                        return
                    last_error = f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    last_error = type(exc).__name__
                time.sleep(0.2)
        self.stop()
        raise ServerStartError(
            f"tuneline serve did not answer within {timeout_s:.0f} s ({last_error}); "
            f"last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM (graceful: workers stop, state is saved), SIGKILL after `grace_s`."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is saved beyond what is already committed."""
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait(timeout=30)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_server(
    state_dir: str | Path,
    *,
    port: int | None = None,
    api_key: str | None,
    model_dirs: Sequence[str | Path] = (),
    fault_rate: float = 0.0,
    latency_ms: float = 0.0,
    extra_args: Sequence[str] = (),
    startup_timeout_s: float = 180.0,
    env: dict[str, str] | None = None,
    state_dir_wait_s: float = 6 * 3600.0,
) -> ServerProcess:
    """Start `python -m tuneline.cli serve` on 127.0.0.1 and return once /v1/models answers.

    `api_key` becomes the server's TUNELINE_API_KEY; None starts it without one (loopback only).
    When another pipeline run's server holds `state_dir` (two `tuneline run` at once with `provider:
    local`), this waits for that run to finish, up to `state_dir_wait_s`, then starts its own: the runs
    take turns on one state directory instead of fighting over it. A server started by hand on it is
    not waited for: ServerStartError at once, naming it and how to use it instead.
    """
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / "server.log"
    deadline = time.monotonic() + state_dir_wait_s
    attempts = 1 if port is not None else 3  # a free port can be taken between probing and binding
    attempt = 0
    while True:
        wait_for_state_dir(state_dir, deadline)
        chosen = port if port is not None else free_port()
        command = [
            sys.executable,
            "-m",
            "tuneline.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(chosen),
            "--state-dir",
            str(state_dir),
            "--fault-rate",
            str(fault_rate),
            "--latency",
            str(latency_ms),
        ]
        for model_dir in model_dirs:
            command += ["--model-dir", str(Path(model_dir).resolve())]
        command += list(extra_args)
        child_env = {**os.environ, **(env or {}), EMBEDDED_ENV: "1"}
        child_env.pop(API_KEY_ENV, None)
        if api_key is not None:
            child_env[API_KEY_ENV] = api_key
        with open(log_path, "ab") as log_file:
            log_file.write(f"\n--- starting tuneline serve on port {chosen} ---\n".encode())
            log_file.flush()
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=child_env
            )
        server = ServerProcess(process, chosen, api_key, state_dir, log_path)
        try:
            server.wait_ready(startup_timeout_s)
            return server
        except ServerStartError:
            tail = server.log_tail().lower()
            if server.process.returncode == 2 and "is in use by" in tail:
                continue  # another run's server took the state directory first: wait for it again
            attempt += 1
            if attempt < attempts and "address already in use" in tail:
                continue
            raise


def wait_for_state_dir(state_dir: Path, deadline: float) -> None:
    """Return once no server holds `state_dir`. Another pipeline run's server is waited for (until
    `deadline`, time.monotonic()); a server a person started fails at once, naming how to use it."""
    announced = False
    while (holder := holder_of(state_dir)) is not None:
        pid = holder.pid if holder.pid is not None else "unknown"
        if not holder.embedded:
            where = f"http://127.0.0.1:{holder.port}/v1" if holder.port else "its URL"
            raise ServerStartError(
                f"{state_dir} is held by a tuneline serve started by hand (pid {pid}): set provider.base_url "
                f"to {where} (and TUNELINE_API_KEY to its key) to train there, or stop it"
            )
        if time.monotonic() >= deadline:
            raise ServerStartError(
                f"{state_dir} is still held by another run's tuneline serve (pid {pid}): that run has not "
                "finished; run again when it has, or give this run another server.state_dir"
            )
        if not announced:
            log.warning("waiting for another run's tuneline serve (pid %s) to release %s", pid, state_dir)
            announced = True
        time.sleep(0.5)
