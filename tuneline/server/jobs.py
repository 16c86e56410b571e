"""Fine-tuning jobs: the create request's rules, the lifecycle, the scheduler and the worker process.

Lifecycle, as the hosted service behaves:
  validating_files -> queued -> running -> succeeded | failed | cancelled; running/queued -> paused -> queued.
- validating_files: the training (and validation) file is checked with tuneline.formats, the same
  rules as the pipeline's validate stage; a bad file fails the job with `invalid_training_file` and
  a message naming the line and the rule.
- running: training happens in a separate worker process (`python -m tuneline.server.jobs`), so the
  API keeps answering; the worker records events, metrics and checkpoints itself, each write guarded
  by its token, and dies with the server (PR_SET_PDEATHSIG, plus a parent check at every step).
- cancel kills the worker at once; pause lets it stop at the next step boundary after saving a
  resumable state, which `resume` continues from.
- A server that stops while jobs run leaves them `running` in the store; the next server start puts
  them back in the queue to resume from their last checkpoint, and fails a job that was interrupted
  `max_job_attempts` times with a clear error. No job stays `running` without a worker.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import io
import json
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneline.formats import check_training_file, detect_kind
from tuneline.server.errors import APIError, extra_input, file_not_found, invalid_request, job_not_found
from tuneline.server.settings import ORGANIZATION, ServerSettings
from tuneline.server.store import (
    ACTIVE_STATUSES,
    ID_ALPHABET,
    JobRecord,
    Store,
    new_id,
    now,
    publish_dir,
)

if TYPE_CHECKING:
    from tuneline.server.training import AutoRules

log = logging.getLogger("tuneline.server.jobs")

CREATE_FIELDS = frozenset(
    {
        "model",
        "training_file",
        "hyperparameters",
        "suffix",
        "validation_file",
        "integrations",
        "seed",
        "method",
        "metadata",
    }
)
HYPERPARAMETER_NAMES = ("n_epochs", "batch_size", "learning_rate_multiplier")
METHODS = ("supervised", "dpo", "reinforcement")
MAX_SEED = 2**31 - 1
MAX_METADATA_PAIRS = 16
KEPT_CHECKPOINTS = 3
RESULT_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")

# What `ModelLookup` answers for a model id: the root base model it descends from, or None if unknown.
ModelLookup = Callable[[str], "str | None"]


# -- the create request ---------------------------------------------------------------------


def parse_create_request(
    body: Any, *, store: Store, base_of: ModelLookup, available_models: Callable[[], Sequence[str]]
) -> JobRecord:
    """A new job (status validating_files) from a create request, or an APIError naming the field."""
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.")
    for key in body:
        if key not in CREATE_FIELDS:
            raise extra_input(key)
    for key in ("model", "training_file"):
        if body.get(key) is None:
            raise invalid_request(
                f"Missing required parameter: '{key}'.", param=key, code="missing_required_parameter"
            )
        if not isinstance(body[key], str) or not body[key]:
            raise invalid_request(f"'{key}' must be a non-empty string.", param=key)

    requested = _hyperparameters_of(body)
    suffix = body.get("suffix")
    if suffix is not None:
        if not isinstance(suffix, str) or not 1 <= len(suffix) <= 64:
            raise invalid_request("suffix must be a string of 1 to 64 characters.", param="suffix")
        if ":" in suffix or any(ch.isspace() for ch in suffix):
            raise invalid_request(
                "suffix must not contain ':' or whitespace: it becomes part of the model name "
                "ft:{base}:{org}:{suffix}:{id}.",
                param="suffix",
            )
    seed = body.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED
    ):
        raise invalid_request(
            f"seed must be an integer between 0 and {MAX_SEED}, got {seed!r}.", param="seed"
        )
    metadata = _metadata_of(body.get("metadata"))
    integrations = body.get("integrations")
    if integrations not in (None, []):
        raise invalid_request(
            "integrations are not supported by this server (it sends no data anywhere): remove `integrations`.",
            param="integrations",
        )

    model = body["model"]
    base = base_of(model)
    if base is None:
        available = ", ".join(available_models()) or "none"
        raise APIError(
            400,
            f"Model {model} is not available for fine-tuning or does not exist. Available models: {available}.",
            param="model",
            code="model_not_available",
        )
    training_file = _fine_tune_file(store, body["training_file"], "training_file")
    validation_file = body.get("validation_file")
    if validation_file is not None:
        if not isinstance(validation_file, str) or not validation_file:
            raise invalid_request("'validation_file' must be a file id.", param="validation_file")
        _fine_tune_file(store, validation_file, "validation_file")

    random_part = "".join(secrets.choice(ID_ALPHABET) for _ in range(8))
    return JobRecord(
        id=new_id("ftjob-"),
        created_at=now(),
        status="validating_files",
        model=model,
        base_model=base,
        training_file=training_file,
        validation_file=validation_file,
        requested_hyperparameters=requested,
        hyperparameters=None,
        suffix=suffix,
        seed=secrets.randbelow(MAX_SEED + 1) if seed is None else seed,
        metadata=metadata,
        model_name=f"ft:{base}:{ORGANIZATION}:{suffix or ''}:{random_part}",
    )


def _hyperparameters_of(body: Mapping[str, Any]) -> dict[str, Any]:
    top = body.get("hyperparameters")
    method = body.get("method")
    from_method: Any = None
    if method is not None:
        if not isinstance(method, dict):
            raise invalid_request("method must be an object such as {'type': 'supervised'}.", param="method")
        for key in method:
            if key not in ("type", *METHODS):
                raise extra_input(f"method.{key}")
        kind = method.get("type")
        if kind is None:
            raise invalid_request("Missing required parameter: 'method.type'.", param="method.type")
        if kind in ("dpo", "reinforcement"):
            raise invalid_request(
                f"method '{kind}' is not supported by this server: only 'supervised' fine-tuning is available.",
                param="method.type",
                code="unsupported_method",
            )
        if kind != "supervised":
            raise invalid_request(
                f"method.type must be one of {', '.join(METHODS)}, got {kind!r}.", param="method.type"
            )
        for other in ("dpo", "reinforcement"):
            if method.get(other) is not None:
                raise invalid_request(
                    f"method.{other} does not go with method.type 'supervised'.", param=f"method.{other}"
                )
        supervised = method.get("supervised")
        if supervised is not None:
            if not isinstance(supervised, dict):
                raise invalid_request("method.supervised must be an object.", param="method.supervised")
            for key in supervised:
                if key != "hyperparameters":
                    raise extra_input(f"method.supervised.{key}")
            from_method = supervised.get("hyperparameters")
    if top is not None and from_method is not None:
        raise invalid_request(
            "Pass hyperparameters either in method.supervised.hyperparameters or in the deprecated "
            "top-level hyperparameters, not both.",
            param="hyperparameters",
        )
    if from_method is not None:
        return _check_hyperparameters(from_method, "method.supervised.hyperparameters")
    return _check_hyperparameters(top or {}, "hyperparameters")


def _check_hyperparameters(values: Any, path: str) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise invalid_request(f"{path} must be an object.", param=path)
    for key in values:
        if key not in HYPERPARAMETER_NAMES:
            raise extra_input(f"{path}.{key}")
    checked: dict[str, Any] = {}
    limits = {"n_epochs": 50, "batch_size": 256}
    for name in HYPERPARAMETER_NAMES:
        value = values.get(name, "auto")
        if value is None or value == "auto":
            checked[name] = "auto"
            continue
        param = f"{path}.{name}"
        if name == "learning_rate_multiplier":
            ok = (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
                and value > 0
            )
            if not ok:
                raise invalid_request(
                    f"{name} must be 'auto' or a number greater than 0, got {value!r}.", param=param
                )
            checked[name] = float(value)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= limits[name]
            if not ok:
                raise invalid_request(
                    f"{name} must be 'auto' or an integer between 1 and {limits[name]}, got {value!r}.",
                    param=param,
                )
            checked[name] = value
    return checked


def _metadata_of(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise invalid_request(
            "metadata must be an object of string keys and string values.", param="metadata"
        )
    if len(metadata) > MAX_METADATA_PAIRS:
        raise invalid_request(
            f"metadata has {len(metadata)} pairs; at most {MAX_METADATA_PAIRS} are allowed.", param="metadata"
        )
    for key, value in metadata.items():
        if len(key) > 64:
            raise invalid_request(
                f"metadata key {key[:20]!r}... is longer than 64 characters.", param="metadata"
            )
        if not isinstance(value, str):
            raise invalid_request(
                f"metadata[{key!r}] must be a string, got {type(value).__name__}.", param="metadata"
            )
        if len(value) > 512:
            raise invalid_request(f"metadata[{key!r}] is longer than 512 characters.", param="metadata")
    return dict(metadata)


def _fine_tune_file(store: Store, file_id: str, param: str) -> str:
    record = store.get_file(file_id)
    if record is None:
        raise file_not_found(file_id, param=param)
    if record.purpose != "fine-tune":
        raise invalid_request(
            f"File {file_id} has purpose '{record.purpose}', but {param} needs a file uploaded with purpose "
            "'fine-tune'.",
            param=param,
            code=f"invalid_{param}",
        )
    return file_id


# -- validating_files -----------------------------------------------------------------------


def file_error(
    store: Store, file_id: str, param: str, min_examples: int
) -> tuple[int, dict[str, Any] | None]:
    """Check a job's file with the pipeline's own rules: (examples, None) or (count, job error)."""
    code = f"invalid_{param}"
    path = store.file_path(file_id)
    if store.get_file(file_id) is None or not path.is_file():
        message = f"The {param.replace('_', ' ')} {file_id} was deleted before the job could use it."
        return 0, {"code": code, "message": message, "param": param}
    with open(path, "rb") as lines:
        count, issue = check_training_file(lines, min_examples=min_examples)
    if issue is None:
        with open(path, "rb") as lines:
            first = next((json.loads(raw) for raw in lines if raw.strip()), None)
        if detect_kind(first) == "preference":
            message = (
                "Invalid file format. Line 1: preference (DPO) examples need method 'dpo', which this server "
                "does not support; supervised jobs take chat examples (preference_example_in_supervised_job)"
            )
            return count, {"code": code, "message": message, "param": param}
        return count, None
    where = f"Line {issue.line}: " if issue.line is not None else ""
    message = f"Invalid file format. {where}{issue.message} ({issue.key})"
    return count, {"code": code, "message": message, "param": param}


def resolve_requested_hyperparameters(
    n_examples: int, requested: Mapping[str, Any], rules: AutoRules | None = None
) -> dict[str, Any]:
    """The job's hyperparameters with every "auto" resolved (the trainer's rule, with the base model's
    AutoRules)."""
    from tuneline.server.training import AutoRules, resolve_hyperparameters

    resolved = resolve_hyperparameters(
        n_examples,
        requested["n_epochs"],
        requested["batch_size"],
        requested["learning_rate_multiplier"],
        rules or AutoRules(),
    )
    return {
        "n_epochs": int(resolved.n_epochs),
        "batch_size": int(resolved.batch_size),
        "learning_rate_multiplier": float(resolved.learning_rate_multiplier),
    }


# -- the scheduler (in the server process) ----------------------------------------------------


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
            self._validate(job)
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
            if self._start_worker(job):
                free -= 1

    def _validate(self, job: JobRecord) -> None:
        min_examples = self.settings.min_training_examples
        events = [f"Validating training file: {job.training_file}"]
        if job.validation_file:
            events.append(f"Validating validation file: {job.validation_file}")
        for message in events:
            self.store.add_event(job.id, message)
        count, error = file_error(self.store, job.training_file, "training_file", min_examples)
        if error is None and job.validation_file:
            _, error = file_error(self.store, job.validation_file, "validation_file", 1)
        if error is None:
            try:
                rules = base_auto_rules(self.store, job, self.settings.model_dirs)
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
            "tuneline.server.jobs",
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
        for model_dir in self.settings.model_dirs:
            command += ["--model-dir", str(model_dir)]
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
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
                remove_work_dirs(self.store, job.id)

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


def remove_work_dirs(store: Store, job_id: str) -> None:
    """Drop a finished job's scratch space (its published checkpoints and model are kept)."""
    shutil.rmtree(store.work_dir / job_id, ignore_errors=True)
    for path in store.work_dir.glob(f"{job_id}.resume-*"):
        shutil.rmtree(path, ignore_errors=True)


# -- the worker (its own process) -------------------------------------------------------------


class JobReporter:
    """What the trainer reports, turned into events, metrics, checkpoints and the stop signal."""

    def __init__(self, store: Store, job: JobRecord, token: str, parent_pid: int) -> None:
        self.store = store
        self.job = job
        self.token = token
        self.parent_pid = parent_pid
        self._first: tuple[int, float] | None = None
        self._checked_at = 0.0
        self._stop = False

    def message(self, text: str, level: str = "info") -> None:
        self.store.add_event(self.job.id, text, level=level, token=self.token)

    def metrics(self, step: int, total_steps: int, data: dict[str, float]) -> None:
        payload: dict[str, Any] = {"step": step, "total_steps": total_steps}
        payload.update({key: float(value) for key, value in data.items()})
        text = f"Step {step}/{total_steps}"
        if "train_loss" in payload:
            text += f": training loss={payload['train_loss']:.2f}"
        if "valid_loss" in payload:
            text += f", validation loss={payload['valid_loss']:.2f}"
        self.store.add_event(self.job.id, text, type="metrics", data=payload, token=self.token)
        clock = time.monotonic()
        if self._first is None or step <= self._first[0]:
            self._first = (step, clock)
        elif total_steps > step:
            per_step = (clock - self._first[1]) / (step - self._first[0])
            finish = now() + round(per_step * (total_steps - step))
            self.store.update_job(self.job.id, token=self.token, estimated_finish=finish)

    def checkpoint(self, step: int, model_dir: Path, metrics: dict[str, float]) -> None:
        model_id = f"{self.job.model_name}:ckpt-step-{step}"
        target = self.store.models_dir / self.job.id / f"ckpt-step-{step}"
        target.parent.mkdir(parents=True, exist_ok=True)
        publish_dir(Path(model_dir), target)
        record, stale = self.store.add_checkpoint(
            self.job.id,
            step=step,
            metrics={k: float(v) for k, v in metrics.items()},
            model_id=model_id,
            path=target,
            token=self.token,
            keep=KEPT_CHECKPOINTS,
        )
        if record is None:
            shutil.rmtree(target, ignore_errors=True)
            return
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)

    def should_stop(self) -> bool:
        if self._stop:
            return True
        if os.getppid() != self.parent_pid:  # the server is gone: stop rather than train for nobody
            self._stop = True
            return True
        clock = time.monotonic()
        if clock - self._checked_at >= 0.2:
            self._checked_at = clock
            state = self.store.job_status(self.job.id)
            self._stop = state is None or state[0] != "running" or state[1] != self.token
        return self._stop


def result_csv(store: Store, job_id: str) -> bytes:
    """The hosted result file: one row per metrics step (the last report of a step wins)."""
    rows: dict[int, dict[str, Any]] = {}
    for event in store.metrics_events(job_id):
        data = event.data or {}
        if "step" not in data:
            continue
        rows[int(data["step"])] = {
            "step": int(data["step"]),
            "train_loss": data.get("train_loss"),
            "train_accuracy": data.get("train_mean_token_accuracy"),
            "valid_loss": data.get("valid_loss"),
            "valid_mean_token_accuracy": data.get("valid_mean_token_accuracy"),
        }
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow({k: ("" if v is None else v) for k, v in rows[step].items()})
    return out.getvalue().encode()


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to kill this process when the server dies, so no orphan trains a job twice."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:
        sys.exit(3)


def base_model_dir(store: Store, job: JobRecord, model_dirs: Sequence[Path]) -> Path:
    """Where the weights to start from are: a model of this server, or a base model."""
    own = store.get_model(job.model)
    if own is not None:
        return Path(own.path)
    from tuneline.server.modeling import resolve_base_model

    try:
        return resolve_base_model(job.model, store.state_dir, model_dirs)
    except KeyError:
        raise RuntimeError(f"the model {job.model} no longer exists on this server") from None


def base_auto_rules(store: Store, job: JobRecord, model_dirs: Sequence[Path]) -> AutoRules:
    """What "auto" hyperparameters mean for the job's base model: its model card's rules, without
    building the built-in model when it is not built yet (its recipe states them)."""
    from tuneline.server.modeling import BUILTIN_MODEL, is_model_dir
    from tuneline.server.training import AutoRules, auto_rules

    own = store.get_model(job.model)
    if own is not None:
        return auto_rules(Path(own.path))
    if job.model == BUILTIN_MODEL:
        from tuneline.server.builtin import builtin_auto_rules

        return builtin_auto_rules()
    for directory in model_dirs:
        if Path(directory).name == job.model and is_model_dir(Path(directory)):
            return auto_rules(Path(directory))
    return AutoRules()


def run_job(
    store: Store, job_id: str, token: str, parent_pid: int, model_dirs: Sequence[Path], lora_above: int
) -> int:
    """Train one job to its end (or until it is paused, cancelled or the server goes away)."""
    job = store.get_job(job_id)
    if job is None or job.worker_token != token:
        return 0
    reporter = JobReporter(store, job, token, parent_pid)
    try:
        from tuneline.server.training import Hyperparameters, TrainingSpec, train

        hyperparameters = job.hyperparameters or {}
        spec = TrainingSpec(
            base_model_dir=base_model_dir(store, job, model_dirs),
            train_file=store.file_path(job.training_file),
            validation_file=store.file_path(job.validation_file) if job.validation_file else None,
            output_dir=store.work_dir / job.id,
            hyperparameters=Hyperparameters(
                n_epochs=int(hyperparameters["n_epochs"]),
                batch_size=int(hyperparameters["batch_size"]),
                learning_rate_multiplier=float(hyperparameters["learning_rate_multiplier"]),
            ),
            seed=job.seed,
            resume_from=Path(job.resume_from) if job.resume_from and Path(job.resume_from).exists() else None,
            lora_above_params=lora_above,
        )
        for name in (spec.train_file, spec.validation_file):
            if name is not None and not name.is_file():
                raise RuntimeError(f"the file {name.name} was deleted while the job waited")
        outcome = train(spec, reporter)
    except Exception as exc:
        log.exception("job %s: training failed", job_id)
        message = f"Fine-tuning job failed: {type(exc).__name__}: {exc}"
        store.transition(
            job_id,
            ("running", "paused", "queued"),
            "failed",
            token=token,
            finished_at=now(),
            worker_token=None,
            estimated_finish=None,
            error={"code": "training_failed", "message": message, "param": None},
            events=[("error", message)],
        )
        return 1

    if outcome.stopped:
        if outcome.model_dir is not None and Path(outcome.model_dir).exists():
            state = store.work_dir / f"{job_id}.resume-{outcome.steps}"
            publish_dir(Path(outcome.model_dir), state)
            saved = store.update_job(job_id, token=token, resume_from=str(state), resume_step=outcome.steps)
            if saved:
                store.add_event(
                    job_id, f"Training stopped at step {outcome.steps}; its state is saved for resuming"
                )
        log.info("job %s: training stopped at step %d", job_id, outcome.steps)
        return 0
    if outcome.model_dir is None:
        raise RuntimeError("the trainer finished without a model directory")

    final_dir = store.models_dir / job_id / "final"
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    publish_dir(Path(outcome.model_dir), final_dir)
    content = base64.b64encode(result_csv(store, job_id))
    result = store.write_blob("step_metrics.csv", "fine-tune-results", content)
    finished = store.finish_job(
        job_id,
        token=token,
        model_path=final_dir,
        result_file=result,
        trained_tokens=int(outcome.trained_tokens),
        hyperparameters=_hyperparameters_dict(outcome.hyperparameters),
    )
    if finished is None:  # cancelled while the model was being saved
        shutil.rmtree(final_dir, ignore_errors=True)
        store.file_path(result.id).unlink(missing_ok=True)
        return 0
    remove_work_dirs(store, job_id)
    log.info("job %s: succeeded -> %s", job_id, finished.fine_tuned_model)
    return 0


def _hyperparameters_dict(hyperparameters: Any) -> dict[str, Any]:
    values = asdict(hyperparameters)
    return {
        "n_epochs": int(values["n_epochs"]),
        "batch_size": int(values["batch_size"]),
        "learning_rate_multiplier": float(values["learning_rate_multiplier"]),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="tuneline fine-tuning worker (started by `tuneline serve`)")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--job", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--parent", required=True, type=int)
    parser.add_argument("--model-dir", action="append", default=[], type=Path)
    parser.add_argument("--lora-above-params", type=int, default=300_000_000)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = Store(args.state_dir)
    try:
        return run_job(store, args.job, args.token, args.parent, args.model_dir, args.lora_above_params)
    finally:
        store.close()


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is committed and fsynced by now; skip the interpreter's teardown of torch and its
    # thread pools, which can take seconds and would hold the job's slot in the queue meanwhile.
    os._exit(code)
