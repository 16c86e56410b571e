"""The worker: one process per running job (`python -m tuneline.server.worker`, started by the
scheduler), which trains the job with tuneline/server/training.py and records what the trainer reports.

Every write carries the worker's token, so a worker that lost its job (cancelled, or taken over by a
restarted server) can change nothing; the worker dies with the server (PR_SET_PDEATHSIG, plus a parent
check at every step).

A job fails, and publishes no model, when its training raises: with the exception's own `code` attribute
and message when it has one (the trainer's `training_diverged`; `invalid_training_file` for an example
longer than the model's context, refused here with its line number before training starts), else with
`training_failed`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import io
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

from tuneline.formats import jsonl_line
from tuneline.server.catalog import CatalogEntry, catalog_from_json, checkpoint_model_name, entry_of
from tuneline.server.method_files import method_chats
from tuneline.server.store import JobRecord, Store, now, publish_dir

log = logging.getLogger("tuneline.server.jobs")

KEPT_CHECKPOINTS = 3
RESULT_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")


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
        model_id = checkpoint_model_name(self.job.model_name, step)
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


class JobFileError(ValueError):
    """A training or validation file the job cannot train on: the job fails with `code`
    (invalid_training_file, invalid_validation_file) and `param`, as a file refused at validation does."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.code = f"invalid_{param}"
        self.param = param


def job_error(exc: BaseException) -> dict[str, Any]:
    """The `error` of a job whose training raised: the exception's own `code` (and `param`) and message
    when it carries one (the trainer's `training_diverged`, a JobFileError), else `training_failed`."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code:
        param = getattr(exc, "param", None)
        return {"code": code, "message": str(exc), "param": param if isinstance(param, str) else None}
    message = f"Fine-tuning job failed: {type(exc).__name__}: {exc}"
    return {"code": "training_failed", "message": message, "param": None}


def check_context(spec: Any, model: str, context_limit: int | None = None) -> None:
    """Refuse, naming its line, an example longer than the model's context (or the catalog's shorter
    `context_length`), as the hosted service does (the trainer would cut it silently): a JobFileError
    with `too_long`, the data plane's reason."""
    from tuneline.server.chat_template import ChatFormat
    from tuneline.server.modeling import context_length_of, load_tokenizer

    chat_format = ChatFormat(load_tokenizer(spec.base_model_dir))
    limit = context_length_of(spec.base_model_dir)
    if context_limit is not None:
        limit = min(limit, context_limit)
    for path, param in ((spec.train_file, "training_file"), (spec.validation_file, "validation_file")):
        if path is None:
            continue
        with open(path, "rb") as handle:  # its lines were bounded when the job's files were validated
            for number, raw in enumerate(handle, start=1):
                line = jsonl_line(raw, number)
                if not line.strip():
                    continue
                chats = method_chats(orjson.loads(line), spec.method)
                tokens = max(len(chat_format.encode_example(chat, sys.maxsize).input_ids) for chat in chats)
                if tokens > limit:
                    raise JobFileError(
                        f"Invalid file format. Line {number}: the example is {tokens} tokens long, but {model} "
                        f"takes at most {limit} tokens per example: shorten it or split it (too_long)",
                        param,
                    )


def base_model_dir(
    store: Store, job: JobRecord, model_dirs: Sequence[Path], catalog: Sequence[CatalogEntry] = ()
) -> Path:
    """Where the weights to start from are: a model of this server, or a base model."""
    own = store.get_model(job.model)
    if own is not None:
        return Path(own.path)
    from tuneline.server.builtin import resolve_base_model  # torch: the worker trains

    try:
        return resolve_base_model(job.model, store.state_dir, model_dirs, catalog=catalog)
    except KeyError:
        raise RuntimeError(f"the model {job.model} no longer exists on this server") from None


def run_job(
    store: Store,
    job_id: str,
    token: str,
    parent_pid: int,
    model_dirs: Sequence[Path],
    lora_above: int,
    gpus_per_job: int | None = None,
    catalog: Sequence[CatalogEntry] = (),
) -> int:
    """Train one job to its end (or until it is paused, cancelled or the server goes away). A catalog
    entry's `training` (lora | full) and `context_length` apply to the fine-tunes of its model."""
    job = store.get_job(job_id)
    if job is None or job.worker_token != token:
        return 0
    entry = entry_of(job.base_model, catalog)
    if entry is not None:
        lora_above = entry.lora_above(lora_above)
    reporter = JobReporter(store, job, token, parent_pid)
    try:
        from tuneline.server.hyperparameters import Hyperparameters
        from tuneline.server.training import TrainingSpec, train

        hyperparameters = job.hyperparameters or {}
        spec = TrainingSpec(
            base_model_dir=base_model_dir(store, job, model_dirs, catalog),
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
            devices=gpus_per_job,
            batch_size_auto=job.requested_hyperparameters.get("batch_size", "auto") == "auto",
            method=job.method_type,
            method_settings=method_settings(job),
            grader_settings=worker_grader_settings() if job.method_type == "reinforcement" else None,
        )
        for name in (spec.train_file, spec.validation_file):
            if name is not None and not name.is_file():
                raise RuntimeError(f"the file {name.name} was deleted while the job waited")
        check_context(spec, job.model, entry.context_length if entry is not None else None)
        outcome = train(spec, reporter)
    except Exception as exc:
        error = job_error(exc)
        if error["code"] == "training_failed":
            log.exception("job %s: training failed", job_id)
        else:
            log.info("job %s: failed (%s)", job_id, error["code"])
        store.transition(
            job_id,
            ("running", "paused", "queued"),
            "failed",
            token=token,
            finished_at=now(),
            worker_token=None,
            estimated_finish=None,
            error=error,
            events=[("error", error["message"])],
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
        hyperparameters={**(job.hyperparameters or {}), **_hyperparameters_dict(outcome.hyperparameters)},
    )
    if finished is None:  # cancelled while the model was being saved
        shutil.rmtree(final_dir, ignore_errors=True)
        store.file_path(result.id).unlink(missing_ok=True)
        return 0
    store.remove_work_dirs(job_id)
    log.info("job %s: succeeded -> %s", job_id, finished.fine_tuned_model)
    return 0


def method_settings(job: JobRecord) -> dict[str, Any]:
    """A DPO or reinforcement job's own settings for its trainer: its resolved hyperparameters beyond
    the three every method has, and a reinforcement job's grader."""
    common = ("n_epochs", "batch_size", "learning_rate_multiplier")
    settings = {k: v for k, v in (job.hyperparameters or {}).items() if k not in common}
    if job.method_type == "reinforcement":
        settings["grader"] = (job.method or {}).get("grader") or {}
    return settings


# The environment variable the scheduler hands this server's own key in, for score_model graders that
# call this server (never on a command line, never logged).
SCORE_MODEL_KEY_ENV = "TUNELINE_WORKER_SCORE_MODEL_KEY"


def worker_grader_settings() -> Any:
    """The graders' settings in a worker: the score_model endpoint and key variable the scheduler put in
    its environment (grader_environment), the python limits of the server's environment."""
    from tuneline.server.services.graders import grader_settings
    from tuneline.server.settings import ServerSettings

    return grader_settings(ServerSettings(state_dir=Path(".")))


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
    parser.add_argument("--gpus-per-job", type=int, default=None)  # None: every visible GPU
    parser.add_argument("--catalog", default="")  # catalog.catalog_json of the server's resolved catalog
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = Store(args.state_dir)
    try:
        return run_job(
            store,
            args.job,
            args.token,
            args.parent,
            args.model_dir,
            args.lora_above_params,
            args.gpus_per_job,
            catalog_from_json(args.catalog),
        )
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
