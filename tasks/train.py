"""train: one fine-tuning job per (dataset, training config), followed to the end, never paid for twice.

Guarantees:
- find-or-create: jobs carry metadata {tuneline_dataset_hash, tuneline_config_hash}; a job with the same
  metadata that is validating, queued, running, paused or succeeded is reattached to, so a rerun after a
  crash (or a rerun with the same data) starts no second job; a lost create response is found again
  before the create is retried;
- the job is created with the configured method (`training.method`: supervised, dpo with
  `training.dpo.beta`, or reinforcement with `training.grader` and `training.reinforcement`) and its
  hyperparameters ("auto" allowed), `suffix` and `seed`; a supervised job's config hash is what it was
  before the methods existed, so a rerun still reattaches to the job it started;
- following is bounded: polls back off exponentially up to `provider.max_poll_interval_s` and the whole
  wait is bounded by `provider.job_timeout_s` (the job keeps running on the provider and a rerun
  reattaches to it);
- events are read incrementally by cursor (newest id seen; events are newest-first, so new pages are read
  until the cursor is reached), messages forwarded to the log, metrics events handed on as step metrics;
- overfitting (validation loss rising while training loss falls) is reported, and with
  `training.choose_best_checkpoint` the candidate is the checkpoint with the lowest full validation loss
  instead of the final model;
- a failed or cancelled job raises `TrainingFailed` with the job's error code and message: no candidate;
- a cancellation request cancels the provider job before raising.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from openai import Omit, omit
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
from prefect import get_run_logger, task
from prefect import runtime as prefect_runtime
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency

from tuneline.config import Config, DpoConfig, ProviderConfig, ReinforcementConfig
from tuneline.provider import Provider, ProviderError, retrying
from tuneline.tokens import price_per_1m
from tuneline.tracking import RunLog

METRIC_NAMES = (
    "train_loss",
    "valid_loss",
    "train_mean_token_accuracy",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
)
ACTIVE_STATUSES = frozenset({"validating_files", "queued", "running", "paused"})
REATTACH_STATUSES = ACTIVE_STATUSES | {"succeeded"}
FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
EVENT_PAGE_SIZE = 100
LOG_EVERY_STEPS = 25
HYPERPARAMETER_NAMES = ("n_epochs", "batch_size", "learning_rate_multiplier")
# What each method adds to them (FineTuneDPOHyperparameters, FineTuneReinforcementHyperparameters).
METHOD_HYPERPARAMETER_NAMES: dict[str, tuple[str, ...]] = {
    "supervised": (),
    "dpo": ("beta",),
    "reinforcement": ("eval_interval", "eval_samples", "compute_multiplier", "reasoning_effort"),
}


class TrainingFailed(RuntimeError):
    """The provider job failed or was cancelled: the message carries its error code and message."""

    def __init__(self, message: str, *, job_id: str, code: str | None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.code = code


@dataclass(frozen=True)
class JobRequest:
    """Everything `fine_tuning.jobs.create` is sent; `metadata` is how the job is found again."""

    model: str
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]
    suffix: str | None
    seed: int | None
    metadata: dict[str, str]
    method: str = "supervised"
    grader: dict[str, Any] | None = None


def method_hyperparameters(config: Config) -> dict[str, Any]:
    """The hyperparameters the job's method is sent: training.hyperparameters, plus beta for dpo, plus
    training.reinforcement's keys for reinforcement."""
    training = config.training
    values = training.hyperparameters.model_dump(mode="json")
    if training.method == "dpo":
        values.update((training.dpo or DpoConfig()).model_dump(mode="json"))
    elif training.method == "reinforcement":
        values.update((training.reinforcement or ReinforcementConfig()).model_dump(mode="json"))
    return values


def training_config_hash(config: Config) -> str:
    """sha256 of what shapes the job (base model, method, hyperparameters, grader, suffix, seed):
    changing an evaluation or tracking setting must not pay for a new job with the same data."""
    shaping: dict[str, Any] = {
        "model": config.model.base,
        "method": config.training.method,
        "hyperparameters": method_hyperparameters(config),
        "suffix": config.training.suffix,
        "seed": config.training.seed,
    }
    if config.training.grader is not None:
        shaping["grader"] = config.training.grader
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def job_metadata(dataset_hash: str, config_hash: str) -> dict[str, str]:
    return {"tuneline_dataset_hash": dataset_hash, "tuneline_config_hash": config_hash}


def job_request(
    config: Config, *, dataset_hash: str, training_file: str, validation_file: str | None
) -> JobRequest:
    return JobRequest(
        model=config.model.base,
        training_file=training_file,
        validation_file=validation_file,
        hyperparameters=method_hyperparameters(config),
        suffix=config.training.suffix,
        seed=config.training.seed,
        metadata=job_metadata(dataset_hash, training_config_hash(config)),
        method=config.training.method,
        grader=config.training.grader,
    )


def method_argument(request: JobRequest) -> dict[str, Any]:
    """The `method` argument of fine_tuning.jobs.create (FineTuneMethod)."""
    settings: dict[str, Any] = {"hyperparameters": request.hyperparameters}
    if request.method == "reinforcement":
        settings["grader"] = request.grader
    return {"type": request.method, request.method: settings}


def find_job(provider: Provider, request: JobRequest) -> FineTuningJob | None:
    """The job to reattach to: a succeeded one (nothing left to pay) or else the newest active one.
    Metadata is checked here too, since a provider may ignore the list filter."""
    matches = [
        job
        for job in provider.client.fine_tuning.jobs.list(metadata=request.metadata, limit=100)
        if job.status in REATTACH_STATUSES
        and job.model == request.model
        and all((job.metadata or {}).get(k) == v for k, v in request.metadata.items())
    ]
    if not matches:
        return None
    succeeded = [job for job in matches if job.status == "succeeded"]
    return max(succeeded or matches, key=lambda job: job.created_at)


def create_job(provider: Provider, request: JobRequest) -> FineTuningJob:
    """Creates the job; the SDK does not retry this POST, `retrying` does after looking for it first."""
    arguments: dict[str, Any] = {
        "model": request.model,
        "training_file": request.training_file,
        "method": method_argument(request),
        "metadata": request.metadata,
    }
    if request.validation_file:
        arguments["validation_file"] = request.validation_file
    if request.suffix:
        arguments["suffix"] = request.suffix
    if request.seed is not None:
        arguments["seed"] = request.seed
    return retrying(
        provider,
        f"create fine-tuning job on {request.model}",
        lambda: provider.without_retries().fine_tuning.jobs.create(**arguments),
        landed=lambda: find_job(provider, request),
    )


@dataclass
class EventCursor:
    """The newest event already handed on; events are listed newest first."""

    newest_id: str | None = None
    newest_created_at: int = -1

    def reached(self, event: FineTuningJobEvent) -> bool:
        return event.id == self.newest_id or event.created_at < self.newest_created_at


def read_new_events(
    provider: Provider, job_id: str, cursor: EventCursor, page_size: int = EVENT_PAGE_SIZE
) -> list[FineTuningJobEvent]:
    """Events newer than the cursor, oldest first; pages newest-first until the cursor is reached, so
    old events are never read again. The cursor advances only once all new events were read."""
    fresh: list[FineTuningJobEvent] = []
    after: str | Omit = omit
    while True:
        page = provider.client.fine_tuning.jobs.list_events(job_id, limit=page_size, after=after)
        reached = False
        for event in page.data:
            if cursor.reached(event):
                reached = True
                break
            fresh.append(event)
        if reached or not page.has_more or not page.data:
            break
        after = page.data[-1].id
    fresh.reverse()
    if fresh:
        cursor.newest_id, cursor.newest_created_at = fresh[-1].id, fresh[-1].created_at
    return fresh


def step_metrics(event: FineTuningJobEvent) -> tuple[int, dict[str, float]] | None:
    """(step, metrics) of a metrics event; None for message events."""
    data = event.data if isinstance(event.data, dict) else None
    if event.type != "metrics" or data is None or data.get("step") is None:
        return None
    values = {name: float(data[name]) for name in METRIC_NAMES if isinstance(data.get(name), int | float)}
    return int(data["step"]), values


@dataclass
class LossHistory:
    """Step metrics in step order, for the overfitting guard."""

    points: dict[int, dict[str, float]] = field(default_factory=dict)

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self.points.setdefault(step, {}).update(metrics)

    def overfitting(self) -> str | None:
        """A warning when validation loss rose from its lowest point while training loss kept falling.
        Full-validation losses (epoch ends) are used when there are two or more, else per-step ones."""
        for valid_name in ("full_valid_loss", "valid_loss"):
            series = [(step, m[valid_name]) for step, m in sorted(self.points.items()) if valid_name in m]
            if len(series) >= 2:
                break
        else:
            return None
        best_step, best_valid = min(series, key=lambda point: point[1])
        last_step, last_valid = series[-1]
        if last_valid <= best_valid:
            return None
        train_at_best = self._train_loss_near(best_step)
        train_at_last = self._train_loss_near(last_step)
        if train_at_best is None or train_at_last is None or train_at_last >= train_at_best:
            return None
        return (
            f"possible overfitting: {valid_name} rose from {best_valid:.4f} (step {best_step}) to "
            f"{last_valid:.4f} (step {last_step}) while train_loss fell from {train_at_best:.4f} to "
            f"{train_at_last:.4f}; consider fewer epochs or more data"
        )

    def _train_loss_near(self, step: int) -> float | None:
        # Mean over the few steps up to `step`: single-step training losses are noisy.
        losses = [m["train_loss"] for s, m in sorted(self.points.items()) if s <= step and "train_loss" in m]
        tail = losses[-5:]
        return sum(tail) / len(tail) if tail else None


@dataclass(frozen=True)
class CandidateChoice:
    """Which model of a finished job is the candidate: the final model, or an earlier checkpoint."""

    model: str
    source: str  # final | checkpoint
    step: int | None
    full_valid_loss: float | None


def choose_candidate(
    fine_tuned_model: str, checkpoints: list[FineTuningJobCheckpoint], *, choose_best: bool
) -> CandidateChoice:
    """The final model, or (when `choose_best`) the checkpoint with the lowest full validation loss if
    that is an earlier checkpoint than the last one (the last one is the final model)."""
    scored = [c for c in checkpoints if c.metrics.full_valid_loss is not None]
    last = max(checkpoints, key=lambda c: c.step_number) if checkpoints else None
    final_loss = last.metrics.full_valid_loss if last else None
    final = CandidateChoice(fine_tuned_model, "final", last.step_number if last else None, final_loss)
    if not choose_best or not scored:
        return final
    best = min(scored, key=lambda c: (c.metrics.full_valid_loss, -c.step_number))
    if last is None or best.step_number == last.step_number:
        return final
    if (
        final_loss is not None
        and best.metrics.full_valid_loss is not None
        and best.metrics.full_valid_loss >= final_loss
    ):
        return final
    return CandidateChoice(
        best.fine_tuned_model_checkpoint, "checkpoint", best.step_number, best.metrics.full_valid_loss
    )


def decode_result_file(raw: bytes) -> bytes:
    """The result CSV whether the provider served it base64-encoded (as api.openai.com does) or plain."""
    stripped = raw.strip()
    try:
        decoded = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        return raw
    # Plain CSV can be valid base64 by accident only if it has no commas or newlines: check the shape.
    return decoded if decoded.lstrip().startswith(b"step") else raw


def resolved_hyperparameters(job: FineTuningJob) -> dict[str, Any]:
    """The job's hyperparameters once the provider has resolved "auto" (missing or "auto" left out)."""
    sources: list[Any] = []
    method_type = job.method.type if job.method is not None and job.method.type else "supervised"
    settings = getattr(job.method, method_type, None) if job.method is not None else None
    if settings is not None and getattr(settings, "hyperparameters", None):
        sources.append(settings.hyperparameters)
    if job.hyperparameters is not None:
        sources.append(job.hyperparameters)
    resolved: dict[str, Any] = {}
    for name in HYPERPARAMETER_NAMES + METHOD_HYPERPARAMETER_NAMES.get(method_type, ()):
        for source in sources:
            value = getattr(source, name, None)
            if value is not None and value != "auto":
                resolved[name] = value
                break
    return resolved


@dataclass(frozen=True)
class TrainingOutcome:
    job_id: str
    reattached: bool
    fine_tuned_model: str
    candidate: CandidateChoice
    trained_tokens: int | None
    actual_cost_usd: float | None
    resolved_hyperparameters: dict[str, Any]
    checkpoints: list[dict[str, Any]]
    result_file_id: str | None
    result_csv: bytes | None
    overfitting_warning: str | None


@dataclass
class JobHooks:
    """What the caller is told while a job runs (the Prefect wrapper wires these to MLflow and Prefect)."""

    on_job: Callable[[FineTuningJob], None] = lambda job: None  # every status seen, first one included
    on_metrics: Callable[[int, dict[str, float]], None] = lambda step, metrics: None
    should_cancel: Callable[[], bool] = lambda: False
    # Held while a job is active on the provider: bounds concurrent jobs per provider.
    job_slot: Callable[[], AbstractContextManager[object]] = nullcontext


def follow_job(
    provider: Provider, job: FineTuningJob, settings: ProviderConfig, hooks: JobHooks, history: LossHistory
) -> FineTuningJob:
    """Polls until the job is final, forwarding new events; bounded by `settings.job_timeout_s`.
    A cancellation request cancels the job on the provider and raises `TrainingFailed`."""
    cursor = EventCursor()
    deadline = time.monotonic() + settings.job_timeout_s
    interval = settings.poll_interval_s
    seen_status: str | None = None
    job_id = job.id
    while True:
        if job.status != seen_status:
            provider.log.info("job %s is %s", job_id, job.status)
            if job.status == "paused":
                provider.log.warning("job %s is paused: resume it on the provider, or cancel the run", job_id)
            seen_status = job.status
            hooks.on_job(job)
        events = retrying(
            provider, f"read events of {job_id}", lambda: read_new_events(provider, job_id, cursor)
        )
        for event in events:
            forward_event(provider, job_id, event, hooks, history)
        if job.status in FINAL_STATUSES:
            return job
        if hooks.should_cancel():
            cancel_job(provider, job_id)
            raise TrainingFailed(
                f"fine-tuning job {job_id} cancelled with the flow run", job_id=job_id, code="cancelled"
            )
        if time.monotonic() + interval > deadline:
            raise ProviderError(
                f"fine-tuning job {job_id} still {job.status} after {settings.job_timeout_s:g}s "
                "(provider.job_timeout_s); it keeps running on the provider: rerun to reattach to it"
            )
        time.sleep(interval)
        # New events mean progress: poll at the base rate again; otherwise back off.
        interval = settings.poll_interval_s if events else min(interval * 1.5, settings.max_poll_interval_s)
        job = retrying(
            provider, f"check job {job_id}", lambda: provider.client.fine_tuning.jobs.retrieve(job_id)
        )


def forward_event(
    provider: Provider, job_id: str, event: FineTuningJobEvent, hooks: JobHooks, history: LossHistory
) -> None:
    level = {"warn": 30, "error": 40}.get(event.level, 20)
    metrics = step_metrics(event)
    # Every event reaches MLflow; of the per-step metrics events, only every LOG_EVERY_STEPS-th and
    # the epoch ends (full validation) are logged, so a run's log stays readable.
    if metrics is None or metrics[0] % LOG_EVERY_STEPS == 0 or "full_valid_loss" in metrics[1]:
        provider.log.log(level, "[%s] %s", job_id, event.message)
    if metrics is not None and metrics[1]:
        step, values = metrics
        history.add(step, values)
        hooks.on_metrics(step, values)


def cancel_job(provider: Provider, job_id: str) -> None:
    """Cancels the provider job (a job already final is left as it is)."""
    job = retrying(provider, f"check job {job_id}", lambda: provider.client.fine_tuning.jobs.retrieve(job_id))
    if job.status in FINAL_STATUSES:
        return
    retrying(provider, f"cancel job {job_id}", lambda: provider.client.fine_tuning.jobs.cancel(job_id))
    provider.log.warning("cancelled fine-tuning job %s on the provider", job_id)


def actual_cost_usd(trained_tokens: int | None, model: str, prices: dict[str, float]) -> float | None:
    """trained_tokens x the configured price per 1M tokens of the base model (None when unknown)."""
    price = price_per_1m(model, prices)
    if trained_tokens is None or price is None:
        return None
    return round(trained_tokens * price / 1_000_000, 6)


def train_model(
    provider: Provider, config: Config, request: JobRequest, hooks: JobHooks | None = None
) -> TrainingOutcome:
    """Find-or-create the job, follow it to the end and return the candidate (see the module guarantees)."""
    hooks = hooks or JobHooks()
    history = LossHistory()
    existing = retrying(provider, "list fine-tuning jobs", lambda: find_job(provider, request))
    if existing is not None and existing.status == "succeeded":
        provider.log.info("job %s already trained this dataset with this config: reusing it", existing.id)
        job, reattached = follow_job(provider, existing, config.provider, hooks, history), True
    else:
        with hooks.job_slot():
            # Looked up again inside the slot: another run may have created it while this one waited.
            existing = existing or retrying(
                provider, "list fine-tuning jobs", lambda: find_job(provider, request)
            )
            if existing is not None:
                provider.log.info("reattaching to fine-tuning job %s (%s)", existing.id, existing.status)
                job, reattached = existing, True
            else:
                job, reattached = create_job(provider, request), False
                provider.log.info("created fine-tuning job %s on %s", job.id, request.model)
            job = follow_job(provider, job, config.provider, hooks, history)
    if job.status != "succeeded":
        error = job.error
        code = error.code if error is not None and error.code else None
        message = error.message if error is not None and error.message else f"job ended {job.status}"
        raise TrainingFailed(
            f"fine-tuning job {job.id} {job.status}: {code or 'no code'}: {message}", job_id=job.id, code=code
        )
    if not job.fine_tuned_model:
        raise TrainingFailed(
            f"fine-tuning job {job.id} succeeded without a fine_tuned_model", job_id=job.id, code=None
        )
    job_id = job.id
    checkpoints = retrying(
        provider,
        f"list checkpoints of {job_id}",
        lambda: list(provider.client.fine_tuning.jobs.checkpoints.list(job_id, limit=100)),
    )
    warning = history.overfitting()
    if warning:
        provider.log.warning("job %s: %s", job_id, warning)
    candidate = choose_candidate(
        job.fine_tuned_model, checkpoints, choose_best=config.training.choose_best_checkpoint
    )
    if candidate.source == "checkpoint":
        provider.log.warning(
            "candidate is checkpoint %s (step %s, full_valid_loss %.4f), not the final model",
            candidate.model,
            candidate.step,
            candidate.full_valid_loss,
        )
    result_file_id = job.result_files[0] if job.result_files else None
    result_csv = None
    if result_file_id is not None:
        raw = retrying(
            provider,
            f"download result file {result_file_id}",
            lambda: provider.client.files.content(result_file_id).read(),
        )
        result_csv = decode_result_file(raw)
    return TrainingOutcome(
        job_id=job.id,
        reattached=reattached,
        fine_tuned_model=job.fine_tuned_model,
        candidate=candidate,
        trained_tokens=job.trained_tokens,
        actual_cost_usd=actual_cost_usd(
            job.trained_tokens, request.model, config.cost.training_price_per_1m_tokens
        ),
        resolved_hyperparameters=resolved_hyperparameters(job),
        checkpoints=[c.model_dump(mode="json") for c in checkpoints],
        result_file_id=result_file_id,
        result_csv=result_csv,
        overfitting_warning=warning,
    )


def concurrency_limit_name(provider: Provider) -> str:
    """The Prefect global concurrency limit that bounds concurrent jobs on this provider."""
    return f"tuneline-jobs-{provider.name}"


def flow_run_cancelling(flow_run_id: str | None) -> bool:
    """True when the flow run was asked to cancel. An unreachable Prefect API counts as "no": a hiccup
    of the orchestrator must not cancel (or fail) a job that is paid for."""
    if flow_run_id is None:
        return False
    try:
        with get_client(sync_client=True) as prefect:
            state = prefect.read_flow_run(UUID(flow_run_id)).state
    except Exception:
        return False
    return state is not None and (state.is_cancelling() or state.is_cancelled())


@task(name="train", cache_policy=NO_CACHE)
def train(
    provider: Provider,
    config: Config,
    request: JobRequest,
    run: RunLog,
    on_job: Callable[[FineTuningJob], None],
) -> TrainingOutcome:
    """Prefect wrapper: messages to this task's log, step metrics to the MLflow run, one concurrency slot
    per active job, and a cancelled flow run cancels the provider job (polled, and on the signal)."""
    logger = get_run_logger()
    provider.log_to(logger)
    flow_run_id = prefect_runtime.flow_run.id
    limit = concurrency_limit_name(provider)
    with get_client(sync_client=True) as prefect:
        prefect.upsert_global_concurrency_limit_by_name(limit, config.provider.max_concurrent_jobs)
    started: list[str] = []

    def seen(job: FineTuningJob) -> None:
        if not started:
            started.append(job.id)
        on_job(job)

    hooks = JobHooks(
        on_job=seen,
        on_metrics=run.log_step,
        should_cancel=lambda: flow_run_cancelling(flow_run_id),
        job_slot=lambda: concurrency(limit, occupy=1, strict=True),
    )
    try:
        return train_model(provider, config, request, hooks)
    except BaseException as exc:
        # A cancellation arrives as a signal (the runner's SIGTERM) or as the polled state: either way the
        # provider job is cancelled, so nobody pays for a run that was called off. A crash is not a
        # cancellation: the job keeps training and the next run reattaches to it.
        if started and not isinstance(exc, TrainingFailed) and flow_run_cancelling(flow_run_id):
            try:
                cancel_job(provider, started[0])
            except ProviderError as failed:
                logger.error("could not cancel job %s on the provider: %s", started[0], failed)
        raise
