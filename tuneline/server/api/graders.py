"""/v1/fine_tuning/alpha/graders: run a grader on one sample, validate a grader."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from tuneline.server.api.common import json_body, respond
from tuneline.server.protocol import RunGraderRequest, ValidateGraderRequest
from tuneline.server.services.graders import GraderService

router = APIRouter(prefix="/v1/fine_tuning/alpha/graders")


def service(request: Request) -> GraderService:
    return request.app.state.graders  # type: ignore[no-any-return]


# Plain `def`: a grade can take seconds (a python grader's child process, a score model's answer), so
# it runs on the thread pool, never on the event loop.
@router.post("/run")
def run_grader(
    body: RunGraderRequest = Depends(json_body(RunGraderRequest)),
    graders: GraderService = Depends(service),
) -> Response:
    return respond(graders.run(body))


@router.post("/validate")
def validate_grader(
    body: ValidateGraderRequest = Depends(json_body(ValidateGraderRequest)),
    graders: GraderService = Depends(service),
) -> Response:
    return respond(graders.validate(body))
