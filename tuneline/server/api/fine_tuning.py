"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, pause, resume; a job's events and checkpoints."""

from __future__ import annotations

import re

from fastapi import APIRouter, Depends, Request, Response

from tuneline.server.api.common import json_body, query, respond
from tuneline.server.errors import invalid_request
from tuneline.server.protocol import (
    CreateFineTuningJobRequest,
    ListCheckpointsQuery,
    ListEventsQuery,
    ListJobsQuery,
)
from tuneline.server.services.jobs import JobService

router = APIRouter(prefix="/v1/fine_tuning/jobs")

# `jobs.list(metadata={"k": "v"})` sends the query parameter `metadata[k]=v`; the literal `metadata=null`
# (the SDK's documented raw form, `extra_query={"metadata": "null"}`) asks for jobs without metadata.
METADATA_QUERY = re.compile(r"^metadata\[(.+)\]$")


def service(request: Request) -> JobService:
    return request.app.state.jobs  # type: ignore[no-any-return]


@router.post("")
def create_job(
    body: CreateFineTuningJobRequest = Depends(json_body(CreateFineTuningJobRequest)),
    jobs: JobService = Depends(service),
) -> Response:
    return respond(jobs.create(body))


@router.get("")
def list_jobs(
    request: Request,
    listed: ListJobsQuery = Depends(query(ListJobsQuery)),
    jobs: JobService = Depends(service),
) -> Response:
    metadata = {
        match.group(1): value
        for key, value in request.query_params.multi_items()
        if (match := METADATA_QUERY.match(key))
    }
    bare = request.query_params.getlist("metadata")
    if bare and (bare != ["null"] or metadata):
        raise invalid_request(
            "metadata must be the literal `metadata=null` (jobs without metadata) or filters of the form "
            "`metadata[key]=value`, not both.",
            param="metadata",
        )
    return respond(jobs.listing(listed, metadata, without_metadata=bool(bare)))


@router.get("/{job_id}")
def retrieve_job(job_id: str, jobs: JobService = Depends(service)) -> Response:
    return respond(jobs.retrieve(job_id))


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, jobs: JobService = Depends(service)) -> Response:
    return respond(jobs.cancel(job_id))


@router.post("/{job_id}/pause")
def pause_job(job_id: str, jobs: JobService = Depends(service)) -> Response:
    return respond(jobs.pause(job_id))


@router.post("/{job_id}/resume")
def resume_job(job_id: str, jobs: JobService = Depends(service)) -> Response:
    return respond(jobs.resume(job_id))


@router.get("/{job_id}/events")
def list_events(
    job_id: str,
    listed: ListEventsQuery = Depends(query(ListEventsQuery)),
    jobs: JobService = Depends(service),
) -> Response:
    return respond(jobs.events(job_id, listed))


@router.get("/{job_id}/checkpoints")
def list_checkpoints(
    job_id: str,
    listed: ListCheckpointsQuery = Depends(query(ListCheckpointsQuery)),
    jobs: JobService = Depends(service),
) -> Response:
    return respond(jobs.checkpoints(job_id, listed))
