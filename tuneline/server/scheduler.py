"""The job scheduler (a thread of the server process): validates new jobs, starts queued ones in
worker processes (tuneline/server/worker.py), reaps them, and carries out cancel, pause and resume.

Lifecycle, as the hosted service behaves:
  validating_files -> queued -> running -> succeeded | failed | cancelled; running/queued -> paused -> queued.
- validating_files: the training (and validation) file is checked with tuneline.formats, the same
  rules as the pipeline's validate stage, for the job's method (tuneline/server/method_files.py); a bad file fails the job with `invalid_training_file` and
  a message naming the line and the rule.
- running: training happens in a separate worker process (`python -m tuneline.server.worker`), so the
  API keeps answering; the worker records events, metrics and checkpoints itself, each write guarded
  by its token, and dies with the server (PR_SET_PDEATHSIG, plus a parent check at every step).
- cancel kills the worker at once; pause lets it stop at the next step boundary after saving a
  resumable state, which `resume` continues from.
- A server that stops while jobs run leaves them `running` in the store; the next server start puts
  them back in the queue to resume from their last checkpoint, and fails a job that was interrupted
  `max_job_attempts` times with a clear error. No job stays `running` without a worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline.formats import MAX_EXAMPLE_BYTES, bounded_lines
from tuneline.server.catalog import (
    BUILTIN_LEARNING_RATE_BATCH_SIZE,
    BUILTIN_MIN_EXAMPLES_SEEN,
    BUILTIN_MODEL,
    CatalogEntry,
    catalog_json,
    model_dir_of,
)
from tuneline.server.errors import invalid_request, job_not_found
from tuneline.server.hyperparameters import AutoRules, auto_rules, resolve_method_hyperparameters
from tuneline.server.method_files import check_method_file
from tuneline.server.settings import ServerSettings
from tuneline.server.store import ACTIVE_STATUSES, JobRecord, Store, now

log = logging.getLogger("tuneline.server.jobs")


# -- validating_files -----------------------------------------------------------------------


def file_error(
    store: Store,
    file_id: str,
    param: str,
    min_examples: int,
    max_example_bytes: int = MAX_EXAMPLE_BYTES,
    method: str = "supervised",
) -> tuple[int, dict[str, Any] | None]:
    """Check a job's file with the pipeline's own rules, for the job's method
    (tuneline/server/method_files.py): (examples, None) or (count, job error).

    A line longer than `max_example_bytes` is refused unread (tuneline.formats.bounded_lines)."""
    code = f"invalid_{param}"
    path = store.file_path(file_id)
    if store.get_file(file_id) is None or not path.is_file():
        message = f"The {param.replace('_', ' ')} {file_id} was deleted before the job could use it."
        return 0, {"code": code, "message": message, "param": param}
    with open(path, "rb") as handle:
        count, issue = check_method_file(
            bounded_lines(handle, max_example_bytes),
            method,
            min_examples=min_examples,
            max_line_bytes=max_example_bytes,
        )
    if issue is None:
        return count, None
    where = f"Line {issue.line}: " if issue.line is not None else ""
    message = f"Invalid file format. {where}{issue.message} ({issue.key})"
    return count, {"code": code, "message": message, "param": param}


def resolve_requested_hyperparameters(
    n_examples: int, requested: Mapping[str, Any], rules: AutoRules | None = None
) -> dict[str, Any]:
    """The job's hyperparameters with every "auto" resolved (tuneline/server/hyperparameters.py, with
    the base model's AutoRules), the method's own (beta; the reinforcement ones) included."""
    return resolve_method_hyperparameters(n_examples, requested, rules or AutoRules())


def base_auto_rules(
    store: Store, job: JobRecord, model_dirs: Sequence[Path], catalog: Sequence[CatalogEntry] = ()
) -> AutoRules:
    """What "auto" hyperparameters mean for the job's base model: its model card's rules, without
    building the built-in model when it is not built yet (catalog.py states its rules)."""
    own = store.get_model(job.model)
    if own is not None:
        return auto_rules(Path(own.path))
    if job.model == BUILTIN_MODEL:
        return AutoRules(BUILTIN_LEARNING_RATE_BATCH_SIZE, BUILTIN_MIN_EXAMPLES_SEEN)
    directory = model_dir_of(job.model, model_dirs, catalog)
    return auto_rules(directory) if directory is not None else AutoRules()


def grader_environment(settings: ServerSettings) -> dict[str, str]:
    """A reinforcement worker's environment: the server's, plus where its score_model graders call (the
    configured endpoint, else this server) and the variable that holds the key (this server's own key
    in a variable of the worker's environment: never on its command line)."""
    from tuneline.server.services.graders import BASE_URL_ENV, KEY_ENV_ENV, grader_settings
    from tuneline.server.worker import SCORE_MODEL_KEY_ENV

    graders = grader_settings(settings)
    environment = dict(os.environ)
    environment[BASE_URL_ENV] = str(graders.score_model_base_url)
    if graders.score_model_api_key is not None:
        environment[SCORE_MODEL_KEY_ENV] = graders.score_model_api_key
        environment[KEY_ENV_ENV] = SCORE_MODEL_KEY_ENV
    return environment


# -- the scheduler ----------------------------------------------------------------------------


@dataclass
class Worker:
    job_id: str
    token: str
    process: subprocess.Popen[bytes]
    log_path: Path


class JobRunner:
    """Validates new jobs, starts queued ones in worker processes (`concurrent_jobs` at a time),
    reaps finished workers, and carries out cancel, pause and resume."""

    def __init__(self, store: Store, settings: ServerSettings) -> None:
        self.store = store
        self.settings = settings
        self._workers: dict[str, Worker] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # lifecycle of the runner itself

    def start(self) -> None:
        self.store.sweep()
        self.recover()
        active = {job.id for job in self.store.jobs_with_status(*ACTIVE_STATUSES)}
        for path in self.store.work_dir.iterdir():
            if path.name.split(".resume-")[0] not in active:
                shutil.rmtree(path, ignore_errors=True)
        self._thread = threading.Thread(target=self._loop, name="tuneline-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the scheduler and every worker; their jobs stay `running` and resume at the next start."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for worker in workers:
            _end_process(worker.process, grace_s=5.0)
            job = self.store.get_job(worker.job_id)
            where = _resume_point(job)
            # A deliberate stop is no failure: the job waits in the queue (this does not count as an attempt).
            moved = self.store.transition(
                worker.job_id,
                ("running",),
                "queued",
                token=worker.token,
                worker_token=None,
                estimated_finish=None,
                events=[
                    (
                        "warn",
                        f"The server was stopped while this job was running; {where} when it starts again",
                    )
                ],
            )
            if moved:
                log.info("job %s: running -> queued (server stopping; %s)", worker.job_id, where)

    def wake(self) -> None:
        self._wake.set()

    def recover(self) -> None:
        """Jobs a previous server left `running` go back to the queue (or fail after too many tries)."""
        for job in self.store.jobs_with_status("running"):
            attempts = job.attempts + 1
            if attempts >= self.settings.max_job_attempts:
                message = (
                    f"The server stopped {attempts} times while this job was running; it is not resumed again. "
                    "Check the job log in the server's state directory, then create a new job."
                )
                self.store.transition(
                    job.id,
                    ("running",),
                    "failed",
                    finished_at=now(),
                    attempts=attempts,
                    worker_token=None,
                    estimated_finish=None,
                    error={"code": "server_restarted", "message": message, "param": None},
                    events=[("error", message)],
                )
                log.warning("job %s: running -> failed (interrupted %d times)", job.id, attempts)
                continue
            where = _resume_point(job)
            self.store.transition(
                job.id,
                ("running",),
                "queued",
                attempts=attempts,
                worker_token=None,
                estimated_finish=None,
                events=[("warn", f"The server stopped while this job was running; {where}")],
            )
            log.warning("job %s: running -> queued (server restarted; %s)", job.id, where)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._tick()
            except Exception:  # the scheduler must outlive any one bad job
                log.exception("job scheduler error")
            self._wake.wait(0.5)
            self._wake.clear()

    def _tick(self) -> None:
        self._reap()
        for job in self.store.jobs_with_status("validating_files"):
            if self._stopping.is_set():
                return
            try:
                self._validate(job)
            except Exception as exc:  # this job fails; the others are served
                self._fail_unexpectedly(job, "validating its files", exc)
        with self._lock:
            free = self.settings.concurrent_jobs - len(self._workers)
            busy = set(self._workers)
        if free <= 0:
            return
        for job in self.store.jobs_with_status("queued"):
            if free <= 0 or self._stopping.is_set():
                break
            if job.id in busy:  # its previous worker is still saving a paused state
                continue
            try:
                started = self._start_worker(job)
            except Exception as exc:
                self._fail_unexpectedly(job, "starting its training process", exc)
                continue
            if started:
                free -= 1

    def _fail_unexpectedly(self, job: JobRecord, doing: str, exc: Exception) -> None:
        """Fail one job whose handling raised (a fault of the server, not of the request): the
        scheduler goes on with the other jobs instead of tripping over this one at every tick."""
        log.error("job %s: failed while %s", job.id, doing, exc_info=exc)
        message = (
            f"The server failed while {doing}: {type(exc).__name__}: {exc}. "
            f"The server log ({self.store.state_dir}) has the details."
        )
        done = self.store.transition(
            job.id,
            ("validating_files", "queued", "running"),
            "failed",
            finished_at=now(),
            worker_token=None,
            estimated_finish=None,
            error={"code": "server_error", "message": message, "param": None},
            events=[("error", message)],
        )
        if done:
            log.info("job %s: %s -> failed (%s)", job.id, job.status, message)

    def _validate(self, job: JobRecord) -> None:
        min_examples = self.settings.min_training_examples
        events = [f"Validating training file: {job.training_file}"]
        if job.validation_file:
            events.append(f"Validating validation file: {job.validation_file}")
        for message in events:
            self.store.add_event(job.id, message)
        limit = self.settings.max_example_bytes
        method = job.method_type
        count, error = file_error(self.store, job.training_file, "training_file", min_examples, limit, method)
        if error is None and job.validation_file:
            _, error = file_error(self.store, job.validation_file, "validation_file", 1, limit, method)
        if error is None:
            try:
                rules = base_auto_rules(self.store, job, self.settings.model_dirs, self.settings.models)
                resolved = resolve_requested_hyperparameters(count, job.requested_hyperparameters, rules)
            except Exception as exc:
                error = {"code": "invalid_hyperparameters", "message": f"{exc}", "param": "hyperparameters"}
        if error is not None:
            done = self.store.transition(
                job.id,
                ("validating_files",),
                "failed",
                finished_at=now(),
                error=error,
                events=[("error", error["message"])],
            )
            if done:
                log.info("job %s: validating_files -> failed (%s)", job.id, error["message"])
            return
        done = self.store.transition(
            job.id,
            ("validating_files",),
            "queued",
            n_train_examples=count,
            hyperparameters=resolved,
            events=[("info", "Files validated, moving job to queued state")],
        )
        if done:
            log.info("job %s: validating_files -> queued (%d examples, %s)", job.id, count, resolved)

    def _start_worker(self, job: JobRecord) -> bool:
        token = secrets.token_hex(12)
        if job.started_at is None:
            message = "Fine-tuning job started"
        elif job.resume_from and Path(job.resume_from).exists():
            message = f"Fine-tuning job resumed from step {job.resume_step}"
        else:
            message = "Fine-tuning job restarted from the beginning"
        started = self.store.transition(
            job.id,
            ("queued",),
            "running",
            worker_token=token,
            started_at=job.started_at or now(),
            estimated_finish=None,
            events=[("info", message)],
        )
        if started is None:
            return False
        log_path = self.store.logs_dir / f"{job.id}.log"
        command = [
            sys.executable,
            "-m",
            "tuneline.server.worker",
            "--state-dir",
            str(self.store.state_dir),
            "--job",
            job.id,
            "--token",
            token,
            "--parent",
            str(os.getpid()),
            "--lora-above-params",
            str(self.settings.lora_above_params),
        ]
        if self.settings.gpus_per_job is not None:
            command += ["--gpus-per-job", str(self.settings.gpus_per_job)]
        for model_dir in self.settings.model_dirs:
            command += ["--model-dir", str(model_dir)]
        if self.settings.models:
            command += ["--catalog", catalog_json(self.settings.models)]
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=grader_environment(self.settings) if job.method_type == "reinforcement" else None,
            )
        with self._lock:
            self._workers[job.id] = Worker(job.id, token, process, log_path)
        log.info("job %s: queued -> running (worker pid %d, log %s)", job.id, process.pid, log_path)
        return True

    def _reap(self) -> None:
        with self._lock:
            finished = [w for w in self._workers.values() if w.process.poll() is not None]
            for worker in finished:
                del self._workers[worker.job_id]
        for worker in finished:
            code = worker.process.returncode
            job = self.store.get_job(worker.job_id)
            if job is None:
                continue
            if job.status == "running" and job.worker_token == worker.token:
                tail = _log_tail(worker.log_path)
                message = (
                    f"The training process exited unexpectedly (exit code {code}). "
                    f"Log: {worker.log_path}. Last output: {tail}"
                )
                self.store.transition(
                    job.id,
                    ("running",),
                    "failed",
                    token=worker.token,
                    finished_at=now(),
                    worker_token=None,
                    estimated_finish=None,
                    error={"code": "training_failed", "message": message, "param": None},
                    events=[("error", message)],
                )
                job = self.store.get_job(job.id) or job
            log.info("job %s: worker exited (code %s); job is %s", job.id, code, job.status)
            if job.status in ("succeeded", "failed", "cancelled"):
                self.store.remove_work_dirs(job.id)

    # API operations that touch workers

    def cancel(self, job_id: str) -> JobRecord:
        job = self.store.get_job(job_id)
        if job is None:
            raise job_not_found(job_id)
        done = self.store.transition(
            job_id,
            ACTIVE_STATUSES,
            "cancelled",
            finished_at=now(),
            worker_token=None,
            estimated_finish=None,
            events=[("info", "Fine-tuning job cancelled")],
        )
        if done is None:
            current = self.store.get_job(job_id) or job
            raise invalid_request(
                f"Job {job_id} cannot be cancelled: it has already {_finished_words(current.status)}.",
                param="fine_tune_id",
                code="invalid_job_status",
            )
        with self._lock:
            worker = self._workers.get(job_id)
        if worker is not None:
            # Nothing of a cancelled job needs saving: stop it now rather than at the next step.
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
        log.info("job %s: %s -> cancelled", job_id, job.status)
        self.wake()
        return done

    def pause(self, job_id: str) -> JobRecord:
        job = self.store.get_job(job_id)
        if job is None:
            raise job_not_found(job_id)
        if job.status == "paused":
            return job
        if job.status == "validating_files":
            raise invalid_request(
                f"Job {job_id} cannot be paused while it validates its files: pause it once it is queued or running.",
                param="fine_tune_id",
                code="invalid_job_status",
            )
        done = self.store.transition(
            job_id,
            ("running", "queued"),
            "paused",
            estimated_finish=None,
            events=[("info", "Fine-tuning job paused")],
        )
        if done is None:
            current = self.store.get_job(job_id) or job
            raise invalid_request(
                f"Job {job_id} cannot be paused: it has already {_finished_words(current.status)}.",
                param="fine_tune_id",
                code="invalid_job_status",
            )
        log.info("job %s: %s -> paused", job_id, job.status)
        return done

    def resume(self, job_id: str) -> JobRecord:
        job = self.store.get_job(job_id)
        if job is None:
            raise job_not_found(job_id)
        done = self.store.transition(
            job_id,
            ("paused",),
            "queued",
            events=[("info", "Fine-tuning job resumed: moving job to queued state")],
        )
        if done is None:
            raise invalid_request(
                f"Job {job_id} cannot be resumed: it is {job.status}, not paused.",
                param="fine_tune_id",
                code="invalid_job_status",
            )
        log.info("job %s: paused -> queued", job_id)
        self.wake()
        return done

    def running_workers(self) -> dict[str, int]:
        """job id -> worker pid, for the jobs that have a live worker now."""
        with self._lock:
            return {job_id: w.process.pid for job_id, w in self._workers.items()}


def _resume_point(job: JobRecord | None) -> str:
    if job is not None and job.resume_from and Path(job.resume_from).exists():
        return f"it resumes from the checkpoint at step {job.resume_step}"
    return "it restarts from the beginning (no checkpoint had been saved yet)"


def _finished_words(status: str) -> str:
    return {"cancelled": "been cancelled"}.get(status, status)


def _end_process(process: subprocess.Popen[bytes], grace_s: float) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(timeout=30)


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"
