"""The server's durable state: SQLite (WAL) for metadata, plain files on disk for blobs and models.

It keeps records (the dataclasses below), not wire shapes: tuneline/server/services/ turns them into
the protocol's response bodies. One module (~800 lines) on purpose: one database, its schema and every
transaction on it, whose guarantees (above) hold only together.

Guarantees:
- Every blob and model directory is written under a temporary name and renamed into place, and its
  row is committed only after the rename; so a crash (kill -9 included) leaves either the whole
  object or none of it. Leftovers (temporary files, blobs without a row) are swept at open.
- Every state change of a job and the event that tells about it commit in one transaction.
- Writes by a job's worker process carry the worker's token: a worker that lost its job (cancelled,
  or restarted by a new server) can no longer change it.
- Lists are ordered by (created_at, insertion order), so `after=<id>` cursors are stable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import string
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

ID_ALPHABET = string.ascii_letters + string.digits
# 2: jobs.method (the job's method type and a reinforcement job's grader; NULL = supervised).
SCHEMA_VERSION = 2

# Job statuses, and those a job can still leave.
ACTIVE_STATUSES = ("validating_files", "queued", "running", "paused")
FINAL_STATUSES = ("succeeded", "failed", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    status TEXT NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_order ON files (created_at, seq);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    base_model TEXT NOT NULL,
    training_file TEXT NOT NULL,
    validation_file TEXT,
    requested_hyperparameters TEXT NOT NULL,
    hyperparameters TEXT,
    suffix TEXT,
    seed INTEGER NOT NULL,
    metadata TEXT,
    model_name TEXT NOT NULL,
    fine_tuned_model TEXT,
    finished_at INTEGER,
    trained_tokens INTEGER,
    result_files TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    estimated_finish INTEGER,
    n_train_examples INTEGER,
    resume_from TEXT,
    resume_step INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker_token TEXT,
    started_at INTEGER,
    method TEXT
);
CREATE INDEX IF NOT EXISTS jobs_order ON jobs (created_at, seq);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_order ON events (job_id, created_at, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    step INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    model_id TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_order ON checkpoints (job_id, created_at, seq);
CREATE TABLE IF NOT EXISTS models (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created INTEGER NOT NULL,
    job_id TEXT NOT NULL,
    path TEXT NOT NULL
);
"""


def new_id(prefix: str) -> str:
    """`file-`, `ftjob-`, `ftevent-`, `ftckpt_`, `chatcmpl-` followed by 24 random letters and digits."""
    return prefix + "".join(secrets.choice(ID_ALPHABET) for _ in range(24))


def now() -> int:
    return int(time.time())


class CursorNotFound(LookupError):
    """`after=<id>` names an object that is not (or no longer) in the list."""

    def __init__(self, cursor: str) -> None:
        super().__init__(cursor)
        self.cursor = cursor


@dataclass(frozen=True)
class FileRecord:
    id: str
    created_at: int
    bytes: int
    filename: str
    purpose: str
    status: str
    sha256: str


@dataclass(frozen=True)
class JobRecord:
    id: str
    created_at: int
    status: str
    model: str
    base_model: str
    training_file: str
    validation_file: str | None
    requested_hyperparameters: dict[str, Any]
    hyperparameters: dict[str, Any] | None
    suffix: str | None
    seed: int
    metadata: dict[str, str] | None
    model_name: str
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    trained_tokens: int | None = None
    result_files: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    estimated_finish: int | None = None
    n_train_examples: int | None = None
    resume_from: str | None = None
    resume_step: int | None = None
    attempts: int = 0
    worker_token: str | None = None
    started_at: int | None = None
    # {"type": "supervised" | "dpo" | "reinforcement", "grader": {...} (reinforcement)}; None = supervised.
    method: dict[str, Any] | None = None

    @property
    def method_type(self) -> str:
        return str((self.method or {}).get("type", "supervised"))


@dataclass(frozen=True)
class EventRecord:
    id: str
    job_id: str
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None


@dataclass(frozen=True)
class CheckpointRecord:
    id: str
    job_id: str
    created_at: int
    step: int
    metrics: dict[str, float]
    model_id: str
    path: str


@dataclass(frozen=True)
class ModelRecord:
    """A model this server made: a fine-tuned model or a checkpoint (`...:ckpt-step-N`)."""

    id: str
    created: int
    job_id: str
    path: str
    kind: Literal["fine-tuned", "checkpoint"]


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _load(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish_dir(source: Path, target: Path) -> None:
    """Copy a directory to `target` so that `target` appears complete or not at all."""
    tmp = target.parent / f".tmp-{target.name}-{secrets.token_hex(4)}"
    shutil.copytree(source, tmp)
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    fsync_dir(target.parent)


class Store:
    """Metadata and blobs under one state directory; safe to use from several threads and processes."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.files_dir = self.state_dir / "files"
        self.models_dir = self.state_dir / "models"
        self.work_dir = self.state_dir / "work"
        self.logs_dir = self.state_dir / "logs"
        for folder in (self.state_dir, self.files_dir, self.models_dir, self.work_dir, self.logs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.db_path = self.state_dir / "tuneline.db"
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._migrate()

    # -- connections and transactions -------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives any process crash; only an OS crash could lose the last commit.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        with self._connections_lock:
            for conn in self._connections:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._connections.clear()
        self._local = threading.local()

    def _migrate(self) -> None:
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.db_path} was written by a newer tuneline (schema {version} > {SCHEMA_VERSION}): "
                    "upgrade tuneline or use another --state-dir"
                )
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
            if "method" not in columns:  # a schema 1 store: its jobs are supervised (NULL)
                conn.execute("ALTER TABLE jobs ADD COLUMN method TEXT")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def sweep(self) -> list[Path]:
        """Remove what a crash may have left: temporary files and directories, blobs without a row.

        Only call this while no worker process runs (the server calls it at start).
        """
        removed: list[Path] = []
        known_files = {row["id"] for row in self._conn().execute("SELECT id FROM files")}
        for path in self.files_dir.iterdir():
            if path.name.startswith(".tmp-") or path.name not in known_files:
                path.unlink(missing_ok=True)
                removed.append(path)
        known_dirs = {Path(row[0]) for row in self._conn().execute("SELECT path FROM models")}
        known_dirs |= {Path(row[0]) for row in self._conn().execute("SELECT path FROM checkpoints")}
        # Only job folders: models/ also holds the built-in base model, which tuneline/server/builtin.py owns.
        for job_dir in self.models_dir.glob("ftjob-*"):
            for path in job_dir.iterdir() if job_dir.is_dir() else ():
                if path.name.startswith(".tmp-") or path not in known_dirs:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        return removed

    def remove_work_dirs(self, job_id: str) -> None:
        """Drop a finished job's scratch space (its published checkpoints and model are kept)."""
        shutil.rmtree(self.work_dir / job_id, ignore_errors=True)
        for path in self.work_dir.glob(f"{job_id}.resume-*"):
            shutil.rmtree(path, ignore_errors=True)

    # -- files ------------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def write_blob(self, filename: str, purpose: str, source: IO[bytes] | bytes) -> FileRecord:
        """Write a file's blob atomically and return its record, not yet listed (see `add_file`)."""
        file_id = new_id("file-")
        tmp = self.files_dir / f".tmp-{file_id}"
        digest = hashlib.sha256()
        size = 0
        with open(tmp, "wb") as out:
            if isinstance(source, bytes):
                out.write(source)
                digest.update(source)
                size = len(source)
            else:
                while chunk := source.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.file_path(file_id))
        fsync_dir(self.files_dir)
        return FileRecord(file_id, now(), size, filename, purpose, "processed", digest.hexdigest())

    def add_file(self, filename: str, purpose: str, source: IO[bytes] | bytes) -> FileRecord:
        """Store a blob atomically, then its row; the file is `processed` once this returns."""
        record = self.write_blob(filename, purpose, source)
        with self._write() as conn:
            self._insert_file(conn, record)
        return record

    @staticmethod
    def _insert_file(conn: sqlite3.Connection, record: FileRecord) -> None:
        conn.execute(
            "INSERT INTO files (id, created_at, bytes, filename, purpose, status, sha256) VALUES (?,?,?,?,?,?,?)",
            (
                record.id,
                record.created_at,
                record.bytes,
                record.filename,
                record.purpose,
                record.status,
                record.sha256,
            ),
        )

    def get_file(self, file_id: str) -> FileRecord | None:
        row = self._conn().execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return _file(row) if row else None

    def list_files(
        self, *, purpose: str | None, after: str | None, limit: int, order: Literal["asc", "desc"]
    ) -> tuple[list[FileRecord], bool]:
        where, params = [], []
        if purpose is not None:
            where.append("purpose = ?")
            params.append(purpose)
        rows, has_more = self._page("files", where, params, after, limit, newest_first=order == "desc")
        return [_file(r) for r in rows], has_more

    def delete_file(self, file_id: str) -> bool:
        with self._write() as conn:
            deleted = conn.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
        if deleted:
            self.file_path(file_id).unlink(missing_ok=True)
        return bool(deleted)

    def _page(
        self,
        table: str,
        where: list[str],
        params: list[Any],
        after: str | None,
        limit: int,
        *,
        newest_first: bool,
    ) -> tuple[list[sqlite3.Row], bool]:
        conn = self._conn()
        where, params = list(where), list(params)
        cmp, direction = ("<", "DESC") if newest_first else (">", "ASC")
        if after is not None:
            cursor = conn.execute(
                f"SELECT created_at, seq FROM {table} WHERE id = ?" + "".join(f" AND {w}" for w in where),
                (after, *params),
            ).fetchone()
            if cursor is None:
                raise CursorNotFound(after)
            where.append(f"(created_at, seq) {cmp} (?, ?)")
            params.extend([cursor["created_at"], cursor["seq"]])
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        rows = conn.execute(
            f"SELECT * FROM {table}{clause} ORDER BY created_at {direction}, seq {direction} LIMIT ?",
            (*params, limit + 1),
        ).fetchall()
        return rows[:limit], len(rows) > limit

    # -- jobs -------------------------------------------------------------------------------

    def create_job(self, job: JobRecord) -> JobRecord:
        """Insert a job in `validating_files` with its first event."""
        with self._write() as conn:
            conn.execute(
                """INSERT INTO jobs (id, created_at, status, model, base_model, training_file, validation_file,
                   requested_hyperparameters, hyperparameters, suffix, seed, metadata, model_name, method)
                   VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)""",
                (
                    job.id,
                    job.created_at,
                    job.status,
                    job.model,
                    job.base_model,
                    job.training_file,
                    job.validation_file,
                    _json(job.requested_hyperparameters),
                    _json(job.hyperparameters),
                    job.suffix,
                    job.seed,
                    _json(job.metadata),
                    job.model_name,
                    _json(job.method),
                ),
            )
            self._event(conn, job.id, f"Created fine-tuning job: {job.id}")
        return job

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def job_status(self, job_id: str) -> tuple[str, str | None] | None:
        """(status, worker token) of a job: the cheap read a worker makes at every step."""
        row = self._conn().execute("SELECT status, worker_token FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def list_jobs(
        self,
        *,
        after: str | None,
        limit: int,
        metadata: Mapping[str, str] | None = None,
        without_metadata: bool = False,
    ) -> tuple[list[JobRecord], bool]:
        """A page of jobs, newest first: those whose metadata has every key-value pair of `metadata`,
        or (`without_metadata`) those created without metadata (none, or an empty object)."""
        where, params = [], []
        if without_metadata:
            where.append("(jobs.metadata IS NULL OR NOT EXISTS (SELECT 1 FROM json_each(jobs.metadata)))")
        for key, value in (metadata or {}).items():
            where.append("EXISTS (SELECT 1 FROM json_each(jobs.metadata) WHERE key = ? AND value = ?)")
            params.extend([key, value])
        rows, has_more = self._page("jobs", where, params, after, limit, newest_first=True)
        return [_job(r) for r in rows], has_more

    def jobs_with_status(self, *statuses: str) -> list[JobRecord]:
        """Jobs in these statuses, oldest first (the order the queue serves them)."""
        marks = ",".join("?" * len(statuses))
        rows = (
            self._conn()
            .execute(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY created_at, seq", statuses)
            .fetchall()
        )
        return [_job(r) for r in rows]

    def transition(
        self,
        job_id: str,
        from_statuses: Sequence[str],
        to_status: str,
        *,
        token: str | None = None,
        events: Sequence[tuple[str, str]] = (),
        **fields: Any,
    ) -> JobRecord | None:
        """Move a job from one of `from_statuses` to `to_status`, set `fields`, and add `events`
        ((level, message) pairs), all in one transaction. None when the job was not in one of
        those statuses (or, with `token`, no longer belongs to that worker): nothing changes then."""
        with self._write() as conn:
            if not self._owns(conn, job_id, from_statuses, token):
                return None
            self._update(conn, job_id, status=to_status, **fields)
            for level, message in events:
                self._event(conn, job_id, message, level=level)
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row)

    def update_job(self, job_id: str, *, token: str | None = None, **fields: Any) -> bool:
        """Set fields of an active job (for a worker: only while it still owns the job)."""
        with self._write() as conn:
            if not self._owns(conn, job_id, ACTIVE_STATUSES, token):
                return False
            self._update(conn, job_id, **fields)
            return True

    @staticmethod
    def _owns(conn: sqlite3.Connection, job_id: str, statuses: Sequence[str], token: str | None) -> bool:
        row = conn.execute("SELECT status, worker_token FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or row["status"] not in statuses:
            return False
        return token is None or row["worker_token"] == token

    _JSON_FIELDS = frozenset(
        {"hyperparameters", "requested_hyperparameters", "metadata", "result_files", "error", "method"}
    )

    def _update(self, conn: sqlite3.Connection, job_id: str, **fields: Any) -> None:
        if not fields:
            return
        columns = ", ".join(f"{name} = ?" for name in fields)
        values = [_json(v) if k in self._JSON_FIELDS else v for k, v in fields.items()]
        conn.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*values, job_id))

    # -- events -----------------------------------------------------------------------------

    def add_event(
        self,
        job_id: str,
        message: str,
        *,
        level: str = "info",
        type: str = "message",
        data: Mapping[str, Any] | None = None,
        token: str | None = None,
    ) -> EventRecord | None:
        """Append an event (for a worker: only while it still owns the job)."""
        with self._write() as conn:
            if token is not None and not self._owns(conn, job_id, ACTIVE_STATUSES, token):
                return None
            return self._event(conn, job_id, message, level=level, type=type, data=data)

    @staticmethod
    def _event(
        conn: sqlite3.Connection,
        job_id: str,
        message: str,
        *,
        level: str = "info",
        type: str = "message",
        data: Mapping[str, Any] | None = None,
    ) -> EventRecord:
        event = EventRecord(new_id("ftevent-"), job_id, now(), level, message, type, dict(data or {}))
        conn.execute(
            "INSERT INTO events (id, job_id, created_at, level, message, type, data) VALUES (?,?,?,?,?,?,?)",
            (event.id, job_id, event.created_at, level, message, type, _json(event.data)),
        )
        return event

    def list_events(self, job_id: str, *, after: str | None, limit: int) -> tuple[list[EventRecord], bool]:
        rows, has_more = self._page("events", ["job_id = ?"], [job_id], after, limit, newest_first=True)
        return [_event(r) for r in rows], has_more

    def metrics_events(self, job_id: str) -> list[EventRecord]:
        """Every metrics event of a job, oldest first."""
        rows = (
            self._conn()
            .execute(
                "SELECT * FROM events WHERE job_id = ? AND type = 'metrics' ORDER BY created_at, seq",
                (job_id,),
            )
            .fetchall()
        )
        return [_event(r) for r in rows]

    # -- checkpoints and models -------------------------------------------------------------

    def add_checkpoint(
        self,
        job_id: str,
        *,
        step: int,
        metrics: Mapping[str, float],
        model_id: str,
        path: Path,
        token: str,
        keep: int = 3,
    ) -> tuple[CheckpointRecord | None, list[Path]]:
        """Record a published checkpoint with its event, keep the newest `keep` by step.

        Returns the record (None when the worker no longer owns the job) and the directories of the
        checkpoints dropped, which the caller deletes after this commit.
        """
        record = CheckpointRecord(new_id("ftckpt_"), job_id, now(), step, dict(metrics), model_id, str(path))
        with self._write() as conn:
            if not self._owns(conn, job_id, ACTIVE_STATUSES, token):
                return None, []
            replaced = conn.execute(
                "SELECT path FROM checkpoints WHERE job_id = ? AND step = ?", (job_id, step)
            ).fetchall()
            conn.execute("DELETE FROM checkpoints WHERE job_id = ? AND step = ?", (job_id, step))
            conn.execute(
                "INSERT INTO checkpoints (id, job_id, created_at, step, metrics, model_id, path) VALUES (?,?,?,?,?,?,?)",
                (record.id, job_id, record.created_at, step, _json(record.metrics), model_id, str(path)),
            )
            self._event(conn, job_id, f"Checkpoint created at step {step} with Snapshot ID: {model_id}")
            # The newest checkpoint is where the job resumes after a server restart.
            conn.execute(
                "UPDATE jobs SET resume_from = ?, resume_step = ? WHERE id = ? "
                "AND (resume_step IS NULL OR resume_step <= ?)",
                (str(path), step, job_id, step),
            )
            dropped = conn.execute(
                "SELECT path FROM checkpoints WHERE job_id = ? ORDER BY step DESC LIMIT -1 OFFSET ?",
                (job_id, keep),
            ).fetchall()
            conn.execute(
                "DELETE FROM checkpoints WHERE job_id = ? AND id NOT IN "
                "(SELECT id FROM checkpoints WHERE job_id = ? ORDER BY step DESC LIMIT ?)",
                (job_id, job_id, keep),
            )
        stale = {Path(r[0]) for r in [*replaced, *dropped]} - {path}
        return record, sorted(stale)

    def list_checkpoints(
        self, job_id: str, *, after: str | None, limit: int
    ) -> tuple[list[CheckpointRecord], bool]:
        rows, has_more = self._page("checkpoints", ["job_id = ?"], [job_id], after, limit, newest_first=True)
        return [_checkpoint(r) for r in rows], has_more

    def latest_checkpoint(self, job_id: str) -> CheckpointRecord | None:
        row = (
            self._conn()
            .execute("SELECT * FROM checkpoints WHERE job_id = ? ORDER BY step DESC LIMIT 1", (job_id,))
            .fetchone()
        )
        return _checkpoint(row) if row else None

    def finish_job(
        self,
        job_id: str,
        *,
        token: str,
        model_path: Path,
        result_file: FileRecord,
        trained_tokens: int,
        hyperparameters: Mapping[str, Any],
    ) -> JobRecord | None:
        """Succeed a job: its model, result file, status and final events in one transaction.

        `result_file`'s blob must already be in place (its row is inserted here). None when the
        worker no longer owns the job (it was cancelled meanwhile): nothing is recorded then.
        """
        with self._write() as conn:
            if not self._owns(conn, job_id, ("running", "paused", "queued"), token):
                return None
            row = conn.execute("SELECT model_name FROM jobs WHERE id = ?", (job_id,)).fetchone()
            model_id = row["model_name"]
            created = now()
            self._insert_file(conn, result_file)
            conn.execute(
                "INSERT INTO models (id, created, job_id, path) VALUES (?,?,?,?)",
                (model_id, created, job_id, str(model_path)),
            )
            self._update(
                conn,
                job_id,
                status="succeeded",
                fine_tuned_model=model_id,
                finished_at=created,
                trained_tokens=trained_tokens,
                result_files=[result_file.id],
                hyperparameters=dict(hyperparameters),
                estimated_finish=None,
                worker_token=None,
                resume_from=None,
            )
            self._event(conn, job_id, f"New fine-tuned model created: {model_id}")
            self._event(conn, job_id, "The job has successfully completed")
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row)

    def get_model(self, model_id: str) -> ModelRecord | None:
        conn = self._conn()
        row = conn.execute(
            "SELECT id, created, job_id, path FROM models WHERE id = ?", (model_id,)
        ).fetchone()
        if row:
            return ModelRecord(row[0], row[1], row[2], row[3], "fine-tuned")
        row = conn.execute(
            "SELECT model_id, created_at, job_id, path FROM checkpoints WHERE model_id = ?", (model_id,)
        ).fetchone()
        return ModelRecord(row[0], row[1], row[2], row[3], "checkpoint") if row else None

    def list_models(self) -> list[ModelRecord]:
        """Every fine-tuned model and kept checkpoint, oldest first."""
        conn = self._conn()
        models = [
            ModelRecord(r[0], r[1], r[2], r[3], "fine-tuned")
            for r in conn.execute("SELECT id, created, job_id, path FROM models ORDER BY created, seq")
        ]
        models += [
            ModelRecord(r[0], r[1], r[2], r[3], "checkpoint")
            for r in conn.execute(
                "SELECT model_id, created_at, job_id, path FROM checkpoints ORDER BY created_at, seq"
            )
        ]
        return sorted(models, key=lambda m: m.created)

    def delete_model(self, model_id: str) -> ModelRecord | None:
        """Forget a fine-tuned model or checkpoint and delete its weights; None when unknown."""
        model = self.get_model(model_id)
        if model is None:
            return None
        with self._write() as conn:
            if model.kind == "fine-tuned":
                conn.execute("DELETE FROM models WHERE id = ?", (model_id,))
            else:
                conn.execute("DELETE FROM checkpoints WHERE model_id = ?", (model_id,))
        shutil.rmtree(model.path, ignore_errors=True)
        return model


def _file(row: sqlite3.Row) -> FileRecord:
    return FileRecord(
        row["id"],
        row["created_at"],
        row["bytes"],
        row["filename"],
        row["purpose"],
        row["status"],
        row["sha256"],
    )


def _job(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        created_at=row["created_at"],
        status=row["status"],
        model=row["model"],
        base_model=row["base_model"],
        training_file=row["training_file"],
        validation_file=row["validation_file"],
        requested_hyperparameters=_load(row["requested_hyperparameters"]),
        hyperparameters=_load(row["hyperparameters"]),
        suffix=row["suffix"],
        seed=row["seed"],
        metadata=_load(row["metadata"]),
        model_name=row["model_name"],
        fine_tuned_model=row["fine_tuned_model"],
        finished_at=row["finished_at"],
        trained_tokens=row["trained_tokens"],
        result_files=_load(row["result_files"]) or [],
        error=_load(row["error"]),
        estimated_finish=row["estimated_finish"],
        n_train_examples=row["n_train_examples"],
        resume_from=row["resume_from"],
        resume_step=row["resume_step"],
        attempts=row["attempts"],
        worker_token=row["worker_token"],
        started_at=row["started_at"],
        method=_load(row["method"]),
    )


def _event(row: sqlite3.Row) -> EventRecord:
    return EventRecord(
        row["id"],
        row["job_id"],
        row["created_at"],
        row["level"],
        row["message"],
        row["type"],
        _load(row["data"]),
    )


def _checkpoint(row: sqlite3.Row) -> CheckpointRecord:
    return CheckpointRecord(
        row["id"],
        row["job_id"],
        row["created_at"],
        row["step"],
        _load(row["metrics"]),
        row["model_id"],
        row["path"],
    )
