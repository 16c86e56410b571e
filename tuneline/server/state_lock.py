"""One server per state directory.

A `tuneline serve` holds an exclusive lock on `<state_dir>/server.lock` (flock: the kernel drops it when
the process dies, kill -9 included, so a crash never leaves a stale lock) for as long as it runs, and
writes there who it is: its pid, its port, and whether a pipeline run started it (`provider: local`)
or a person did. A second server on the same state directory refuses to start (it would otherwise
take the first one's running jobs over); a pipeline run that finds another run's server there waits
for it (tuneline/server/launcher.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

LOCK_FILE = "server.lock"
# Set by the launcher in the environment of the servers it starts for pipeline runs.
EMBEDDED_ENV = "TUNELINE_SERVER_EMBEDDED"


@dataclass(frozen=True)
class Holder:
    """The server holding a state directory (pid None: it has not written its name yet)."""

    pid: int | None
    port: int | None
    embedded: bool


class StateDirBusy(RuntimeError):
    """Another server holds the state directory."""

    def __init__(self, state_dir: Path, holder: Holder) -> None:
        who = "a pipeline run's tuneline serve" if holder.embedded else "another tuneline serve"
        pid = f"pid {holder.pid}" if holder.pid is not None else "pid unknown"
        port = f", port {holder.port}" if holder.port is not None else ""
        super().__init__(
            f"the state directory {state_dir} is in use by {who} ({pid}{port}): stop it, or give this "
            "server another --state-dir (server.state_dir)"
        )
        self.holder = holder


def _read(handle: IO[str]) -> Holder:
    handle.seek(0)
    try:
        data = json.loads(handle.read() or "{}")
    except ValueError:
        data = {}
    pid, port = data.get("pid"), data.get("port")
    return Holder(
        pid if isinstance(pid, int) else None,
        port if isinstance(port, int) else None,
        bool(data.get("embedded")),
    )


def holder_of(state_dir: Path) -> Holder | None:
    """The server holding `state_dir` now, None when no server does."""
    path = Path(state_dir) / LOCK_FILE
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(handle)
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


class StateDirLock:
    """The lock a server holds on its state directory while it runs."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self._handle: IO[str] | None = None

    def acquire(self, *, port: int, embedded: bool) -> None:
        """Hold the state directory, or raise StateDirBusy naming the server that does."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.state_dir / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held until release
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(handle)
            handle.close()
            raise StateDirBusy(self.state_dir, holder) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "port": port, "embedded": embedded}))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        """Drop the lock (a server killed by a signal never gets here: the kernel drops it then, and
        the stale name left in the file is never read, as nobody holds the lock)."""
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.truncate(0)
            self._handle.close()  # closing drops the lock
            self._handle = None
