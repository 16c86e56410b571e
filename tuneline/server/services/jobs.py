"""/v1/fine_tuning/jobs: creating jobs, reading them, their events and checkpoints, and the commands
(cancel, pause, resume) that the scheduler (tuneline/server/scheduler.py) carries out.

`job_object` is the one place a job record becomes the wire's FineTuningJob.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tuneline.server.catalog import fine_tuned_model_name
from tuneline.server.errors import APIError, file_not_found, invalid_request, job_not_found
from tuneline.server.protocol import (
    MAX_SEED,
    CreateFineTuningJobRequest,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobEvent,
    JobDPOHyperparameters,
    JobDPOMethod,
    JobError,
    JobHyperparameters,
    JobMethod,
    JobReinforcementHyperparameters,
    JobReinforcementMethod,
    JobSupervisedMethod,
    ListCheckpointsQuery,
    ListEventsQuery,
    ListFineTuningJobCheckpointsResponse,
    ListFineTuningJobEventsResponse,
    ListJobsQuery,
    ListPaginatedFineTuningJobsResponse,
)
from tuneline.server.scheduler import JobRunner
from tuneline.server.services.models import ModelService
from tuneline.server.services.paging import stale_cursor
from tuneline.server.settings import ORGANIZATION
from tuneline.server.store import CheckpointRecord, CursorNotFound, EventRecord, JobRecord, Store, new_id, now

log = logging.getLogger("tuneline.server")

# What `ModelLookup` answers for a model id: the root base model it descends from, or None if unknown.
ModelLookup = Callable[[str], "str | None"]


def job_object(job: JobRecord) -> FineTuningJob:
    """A job as the API answers it: the resolved hyperparameters once known, the requested ones before;
    the top-level (deprecated) hyperparameters are the three every method has, `method` reports the
    method's own (beta; the reinforcement ones) and a reinforcement job's grader."""
    values = job.hyperparameters or job.requested_hyperparameters
    hyperparameters = JobHyperparameters(
        **{key: values[key] for key in ("n_epochs", "batch_size", "learning_rate_multiplier")}
    )
    return FineTuningJob(
        id=job.id,
        created_at=job.created_at,
        error=JobError(**job.error) if job.error else None,
        fine_tuned_model=job.fine_tuned_model,
        finished_at=job.finished_at,
        hyperparameters=hyperparameters,
        model=job.model,
        organization_id=f"org-{ORGANIZATION}",
        result_files=list(job.result_files),
        status=job.status,  # type: ignore[arg-type]
        trained_tokens=job.trained_tokens,
        training_file=job.training_file,
        validation_file=job.validation_file,
        integrations=[],
        seed=job.seed,
        estimated_finish=job.estimated_finish if job.status == "running" else None,
        method=method_object(job, hyperparameters),
        metadata=job.metadata,
        user_provided_suffix=job.suffix,
    )


def method_object(job: JobRecord, common: JobHyperparameters) -> JobMethod:
    values = job.hyperparameters or job.requested_hyperparameters
    kind = job.method_type
    if kind == "dpo":
        dpo = JobDPOHyperparameters(**common.model_dump(), beta=values.get("beta", "auto"))
        return JobMethod(type="dpo", dpo=JobDPOMethod(hyperparameters=dpo))
    if kind == "reinforcement":
        extra = {
            key: values.get(key, "auto") for key in ("compute_multiplier", "eval_interval", "eval_samples")
        }
        reinforcement = JobReinforcementHyperparameters(
            **common.model_dump(), reasoning_effort=values.get("reasoning_effort", "default"), **extra
        )
        grader = (job.method or {}).get("grader") or {}
        return JobMethod(
            type="reinforcement",
            reinforcement=JobReinforcementMethod(grader=grader, hyperparameters=reinforcement),
        )
    return JobMethod(type="supervised", supervised=JobSupervisedMethod(hyperparameters=common))


def event_object(event: EventRecord) -> FineTuningJobEvent:
    return FineTuningJobEvent(
        id=event.id,
        created_at=event.created_at,
        level=event.level,  # type: ignore[arg-type]
        message=event.message,
        type=event.type,  # type: ignore[arg-type]
        data=event.data or {},
    )


def checkpoint_object(checkpoint: CheckpointRecord) -> FineTuningJobCheckpoint:
    return FineTuningJobCheckpoint(
        id=checkpoint.id,
        created_at=checkpoint.created_at,
        fine_tuned_model_checkpoint=checkpoint.model_id,
        fine_tuning_job_id=checkpoint.job_id,
        metrics={"step": checkpoint.step, **checkpoint.metrics},
        step_number=checkpoint.step,
    )


def new_job(
    request: CreateFineTuningJobRequest,
    *,
    store: Store,
    base_of: ModelLookup,
    available_models: Callable[[], Sequence[str]],
    grader_settings: Any = None,
) -> JobRecord:
    """A new job (status validating_files, not stored yet) from a valid create request, or the
    APIError of a model or file the request names that this server does not have."""
    base = base_of(request.model)
    if base is None:
        available = ", ".join(available_models()) or "none"
        raise APIError(
            400,
            f"Model {request.model} is not available for fine-tuning or does not exist. "
            f"Available models: {available}.",
            param="model",
            code="model_not_available",
        )
    if request.method is not None and request.method.reinforcement is not None:
        from tuneline.server.graders import GraderError, parse_grader

        param = "method.reinforcement.grader"
        try:
            parse_grader(request.method.reinforcement.grader, param, grader_settings)
        except GraderError as exc:
            raise APIError(400, str(exc), param=exc.param or param, code="invalid_grader") from None
    _fine_tune_file(store, request.training_file, "training_file")
    if request.validation_file is not None:
        _fine_tune_file(store, request.validation_file, "validation_file")
    return JobRecord(
        id=new_id("ftjob-"),
        created_at=now(),
        status="validating_files",
        model=request.model,
        base_model=base,
        training_file=request.training_file,
        validation_file=request.validation_file,
        requested_hyperparameters=request.requested_hyperparameters(),
        hyperparameters=None,
        suffix=request.suffix,
        seed=secrets.randbelow(MAX_SEED + 1) if request.seed is None else request.seed,
        metadata=dict(request.metadata) if request.metadata is not None else None,
        model_name=fine_tuned_model_name(base, request.suffix),
        method=request.method_record(),
    )


def _fine_tune_file(store: Store, file_id: str, param: str) -> None:
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


class JobService:
    def __init__(self, store: Store, runner: JobRunner, models: ModelService) -> None:
        self.store = store
        self.runner = runner
        self.models = models

    def create(self, request: CreateFineTuningJobRequest) -> FineTuningJob:
        from tuneline.server.services.graders import grader_settings

        job = new_job(
            request,
            store=self.store,
            base_of=self.models.base_of,
            available_models=self.models.available,
            grader_settings=grader_settings(self.runner.settings)
            if request.method_type == "reinforcement"
            else None,
        )
        self.store.create_job(job)
        log.info(
            "job %s: created -> validating_files (model %s, file %s)", job.id, job.model, job.training_file
        )
        self.runner.wake()
        return job_object(job)

    def listing(
        self, query: ListJobsQuery, metadata: Mapping[str, str], without_metadata: bool = False
    ) -> ListPaginatedFineTuningJobsResponse:
        try:
            jobs, has_more = self.store.list_jobs(
                after=query.after, limit=query.limit, metadata=metadata, without_metadata=without_metadata
            )
        except CursorNotFound as exc:
            raise stale_cursor(exc, "fine-tuning job") from None
        return ListPaginatedFineTuningJobsResponse(data=[job_object(j) for j in jobs], has_more=has_more)

    def retrieve(self, job_id: str) -> FineTuningJob:
        return job_object(self._job(job_id))

    def cancel(self, job_id: str) -> FineTuningJob:
        return job_object(self.runner.cancel(job_id))

    def pause(self, job_id: str) -> FineTuningJob:
        return job_object(self.runner.pause(job_id))

    def resume(self, job_id: str) -> FineTuningJob:
        return job_object(self.runner.resume(job_id))

    def events(self, job_id: str, query: ListEventsQuery) -> ListFineTuningJobEventsResponse:
        self._job(job_id)
        try:
            events, has_more = self.store.list_events(job_id, after=query.after, limit=query.limit)
        except CursorNotFound as exc:
            raise stale_cursor(exc, "event") from None
        return ListFineTuningJobEventsResponse(data=[event_object(e) for e in events], has_more=has_more)

    def checkpoints(self, job_id: str, query: ListCheckpointsQuery) -> ListFineTuningJobCheckpointsResponse:
        self._job(job_id)
        try:
            records, has_more = self.store.list_checkpoints(job_id, after=query.after, limit=query.limit)
        except CursorNotFound as exc:
            raise stale_cursor(exc, "checkpoint") from None
        data = [checkpoint_object(c) for c in records]
        return ListFineTuningJobCheckpointsResponse(
            data=data,
            has_more=has_more,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
        )

    def _job(self, job_id: str) -> JobRecord:
        job = self.store.get_job(job_id)
        if job is None:
            raise job_not_found(job_id)
        return job
