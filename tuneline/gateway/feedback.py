"""User feedback that is never lost once acknowledged: a durable local spool, then MLflow, with retries.

`POST /v1/feedback` is acknowledged only after the feedback is on disk: one JSON file per feedback in
`serving.feedback_spool`, written to a temporary name, fsync'd, renamed and the folder fsync'd (so a
crash either leaves no file, and the client got no acknowledgement, or a whole one). A sender thread
then writes each spooled feedback to MLflow and deletes its file only once MLflow has it:
- a `Feedback(name="user_feedback", value, rationale=comment, source=AssessmentSource(HUMAN, user))`;
- a correction (what the answer should have been) as an `Expectation(name="correction", value=...)`,
  which the monitor turns into training data.
Both through MLflow's `TracingClient(tracking_uri).log_assessment`, which is what `mlflow.log_feedback`
and `mlflow.log_expectation` call, on the gateway's own store rather than the process-wide tracking
URI. Each carries the metadata `tuneline.feedback_id`.
What is done is recorded in the file as it goes (the feedback's assessment id), so a retry after a
partial failure never logs the same feedback twice. A failure (tracking backend down; a trace not
exported yet) is retried with backoff, also after a restart (the spool is read again at start).
Several gateway processes may share a spool: one at a time delivers (an flock on `.sender.lock`). A
feedback whose trace still does not exist after `give_up_after_s` moves to `dead/` in the spool, with
its last error: kept, never silently dropped.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("tuneline.gateway")

FEEDBACK_NAME = "user_feedback"
CORRECTION_NAME = "correction"
ANONYMOUS = "anonymous"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(json.dumps(data, ensure_ascii=False).encode())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass
class SpoolStats:
    accepted: int = 0
    delivered: int = 0
    retries: int = 0
    dead: int = 0


class FeedbackSpool:
    """The spool folder and the thread that delivers it to MLflow."""

    def __init__(
        self,
        folder: Path,
        tracking_uri: str,
        *,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
        give_up_after_s: float = 24 * 3600.0,
    ) -> None:
        self.folder = folder
        self.dead = folder / "dead"
        self.tracking_uri = tracking_uri
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.give_up_after_s = give_up_after_s
        self.stats = SpoolStats()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tuneline-feedback", daemon=True)
        self._client: Any = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dead.mkdir(exist_ok=True)
        for stale in self.folder.glob(".*.tmp"):  # a write that crashed before its rename
            stale.unlink(missing_ok=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5.0)

    def accept(
        self,
        trace_id: str,
        value: Any,
        user: str | None,
        comment: str | None = None,
        correction: Any = None,
    ) -> str:
        """Spool one feedback durably and return its id; only then may the client be told it is kept."""
        feedback_id = f"fb-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        entry = {
            "id": feedback_id,
            "trace_id": trace_id,
            "value": value,
            "comment": comment,
            "correction": correction,
            "user": user or ANONYMOUS,
            "received_at": time.time(),
            "attempts": 0,
            "feedback_assessment_id": None,
            "correction_assessment_id": None,
            "last_error": None,
        }
        write_durably(self.folder / f"{feedback_id}.json", entry)
        self.stats.accepted += 1
        self._idle.clear()
        self._wake.set()
        return feedback_id

    def pending(self) -> list[Path]:
        return sorted(self.folder.glob("fb-*.json"))

    def wait_delivered(self, timeout_s: float = 30.0) -> bool:
        """Wait until the spool is empty (every feedback delivered or moved to dead/)."""
        deadline = time.monotonic() + timeout_s
        while self.pending():
            if time.monotonic() > deadline:
                return False
            self._wake.set()
            self._idle.wait(0.05)
        return True

    # --- delivery ------------------------------------------------------------------------------------

    def _tracing_client(self) -> Any:
        if self._client is None:
            from mlflow.tracing.client import TracingClient

            self._client = TracingClient(self.tracking_uri)
        return self._client

    def _deliver(self, entry: dict[str, Any], path: Path) -> None:
        from mlflow.entities import AssessmentSource, AssessmentSourceType, Expectation, Feedback

        client = self._tracing_client()
        source = AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id=entry["user"])
        metadata = {"tuneline.feedback_id": entry["id"]}
        if entry["feedback_assessment_id"] is None:
            feedback = Feedback(
                name=FEEDBACK_NAME,
                value=entry["value"],
                rationale=entry["comment"],
                source=source,
                metadata=metadata,
            )
            assessment = client.log_assessment(entry["trace_id"], feedback)
            entry["feedback_assessment_id"] = assessment.assessment_id
            write_durably(path, entry)
        if entry["correction"] is not None and entry["correction_assessment_id"] is None:
            correction = Expectation(
                name=CORRECTION_NAME, value=entry["correction"], source=source, metadata=metadata
            )
            expectation = client.log_assessment(entry["trace_id"], correction)
            entry["correction_assessment_id"] = expectation.assessment_id
            write_durably(path, entry)

    def _hold_sender_lock(self) -> Any:
        """Wait (until stopped) for the spool's sender lock: with several gateway processes on one spool
        (uvicorn workers), one delivers and the others only write; the kernel frees the lock of a
        process that dies, and another takes over. None when stopped first."""
        handle = open(self.folder / ".sender.lock", "a+b")  # noqa: SIM115 (held for the thread's life)
        while not self._stop.is_set():
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return handle
            except OSError:
                self._stop.wait(1.0)
        handle.close()
        return None

    def _run(self) -> None:
        lock = self._hold_sender_lock()
        if lock is None:
            return
        try:
            self._deliver_loop()
        finally:
            lock.close()

    def _deliver_loop(self) -> None:
        delay = self.retry_initial_s
        while not self._stop.is_set():
            failed = False
            for path in self.pending():
                if self._stop.is_set():
                    return
                try:
                    entry = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError) as exc:
                    log.error("feedback spool file %s unreadable (%s); moved to dead/", path.name, exc)
                    path.replace(self.dead / path.name)
                    self.stats.dead += 1
                    continue
                try:
                    self._deliver(entry, path)
                except Exception as exc:
                    failed = True
                    self.stats.retries += 1
                    entry["attempts"] = int(entry.get("attempts", 0)) + 1
                    entry["last_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
                    if time.time() - float(entry.get("received_at", time.time())) > self.give_up_after_s:
                        write_durably(self.dead / path.name, entry)
                        self.stats.dead += 1  # counted before the file goes: see below
                        path.unlink(missing_ok=True)
                        log.error(
                            "feedback %s for trace %s not delivered after %d attempts (%s); kept in %s",
                            entry["id"],
                            entry["trace_id"],
                            entry["attempts"],
                            entry["last_error"],
                            self.dead,
                        )
                    else:
                        write_durably(path, entry)
                        if entry["attempts"] in (1, 10, 100):
                            log.warning(
                                "feedback %s not delivered yet (%s); retrying",
                                entry["id"],
                                entry["last_error"],
                            )
                    break  # back off, then start again from the oldest
                else:
                    # Counted before the spool file goes, never after: a reader of the stats must not see
                    # an empty spool while the last delivery is still uncounted.
                    self.stats.delivered += 1
                    path.unlink(missing_ok=True)
            if failed:  # new feedback does not cut the backoff short: it waits in the spool
                if self._stop.wait(delay):
                    return
                delay = min(self.retry_max_s, delay * 2)
                continue
            delay = self.retry_initial_s
            if not self.pending():
                self._idle.set()
                self._wake.wait(1.0)
                self._wake.clear()
