"""The graders endpoints: `/v1/fine_tuning/alpha/graders/validate` parses a grader and shows it back
(a 400 naming `grader.<field>` when it is invalid); `/run` grades one model sample against one item.

A grade that fails (a python grader raising, a score model unreachable, a template variable the item
lacks) is not a request error: as on the hosted API, `/run` answers 200 with reward 0 and the failure
in `metadata.errors` (its flag, and the details for python and model graders).

`score_model` graders call, by default, this very server (`http://127.0.0.1:<port>/v1`, with its own
API key), so any model it serves can grade; TUNELINE_SCORE_MODEL_BASE_URL points them elsewhere and
TUNELINE_SCORE_MODEL_API_KEY_ENV names the variable holding that endpoint's key. A python grader's
limits: TUNELINE_PYTHON_GRADER_TIMEOUT_S (default 10) and TUNELINE_PYTHON_GRADER_MEMORY_MB (512).
"""

from __future__ import annotations

import ipaddress
import os
import threading
import time
from typing import Any

from tuneline.server.errors import APIError, invalid_request
from tuneline.server.graders import Grade, GradeReport, GraderError, GraderSettings, parse_grader, sample_of
from tuneline.server.protocol import (
    GraderRunErrors,
    GraderRunMetadata,
    RunGraderRequest,
    RunGraderResponse,
    ValidateGraderRequest,
    ValidateGraderResponse,
)
from tuneline.server.settings import ServerSettings

BASE_URL_ENV = "TUNELINE_SCORE_MODEL_BASE_URL"
KEY_ENV_ENV = "TUNELINE_SCORE_MODEL_API_KEY_ENV"
# Grades run at once by /run (each can hold a request thread for a python grader's whole time limit);
# one more is answered 429 with Retry-After, which the openai SDK waits out and retries.
MAX_CONCURRENT_RUNS = 8
PYTHON_TIMEOUT_ENV = "TUNELINE_PYTHON_GRADER_TIMEOUT_S"
PYTHON_MEMORY_ENV = "TUNELINE_PYTHON_GRADER_MEMORY_MB"
# A flag of `metadata.errors` for each kind of failed grade (GraderError.kind); the rest: other_error.
FLAGS = frozenset(
    {
        "formula_parse_error",
        "invalid_variable_error",
        "python_grader_runtime_error",
        "python_grader_server_error",
        "model_grader_server_error",
        "model_grader_refusal_error",
        "model_grader_parse_error",
    }
)


def _loopback(host: str) -> str:
    """The address this server answers itself on."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return host


def grader_settings(settings: ServerSettings, environ: dict[str, str] | None = None) -> GraderSettings:
    environ = dict(os.environ) if environ is None else environ
    base_url = environ.get(BASE_URL_ENV)
    key_env = environ.get(KEY_ENV_ENV)
    key = None
    if not base_url:
        host = _loopback(settings.host)
        host = f"[{host}]" if ":" in host else host
        base_url = f"http://{host}:{settings.port}/v1"
        key_env, key = None, settings.api_key
    defaults = GraderSettings()
    return GraderSettings(
        score_model_base_url=base_url,
        score_model_api_key_env=key_env,
        score_model_api_key=key,
        python_timeout_s=_positive(environ, PYTHON_TIMEOUT_ENV, defaults.python_timeout_s),
        python_memory_mb=int(_positive(environ, PYTHON_MEMORY_ENV, defaults.python_memory_mb)),
    )


def _positive(environ: dict[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{name} must be a positive number, got {raw!r}")
    return value


def bad_grader(error: GraderError) -> APIError:
    return invalid_request(error.message, param=error.param, code="invalid_grader")


class GraderService:
    def __init__(self, settings: GraderSettings, max_concurrent_runs: int = MAX_CONCURRENT_RUNS) -> None:
        self.settings = settings
        self.max_concurrent_runs = max_concurrent_runs
        self._slots = threading.BoundedSemaphore(max_concurrent_runs)

    @classmethod
    def for_server(cls, settings: ServerSettings) -> GraderService:
        return cls(grader_settings(settings))

    def validate(self, body: ValidateGraderRequest) -> ValidateGraderResponse:
        try:
            grader = parse_grader(body.grader, "grader", self.settings)
        except GraderError as error:
            raise bad_grader(error) from None
        return ValidateGraderResponse(grader=grader.spec())

    def run(self, body: RunGraderRequest) -> RunGraderResponse:
        try:
            grader = parse_grader(body.grader, "grader", self.settings)
        except GraderError as error:
            raise bad_grader(error) from None
        if not self._slots.acquire(blocking=False):
            raise APIError(
                429,
                f"Too many graders are running on this server ({self.max_concurrent_runs} at once): "
                "retry in a moment.",
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        sample = sample_of(body.model_sample)
        errors = GraderRunErrors()
        started = time.monotonic()
        try:
            grade = grader.evaluate(sample, body.item or {})
        except GraderError as error:
            grade = Grade(0.0, error.report or GradeReport())
            flag = error.kind if error.kind in FLAGS else "other_error"
            setattr(errors, flag, True)
            if flag == "python_grader_runtime_error":
                errors.python_grader_runtime_error_details = error.message
            elif flag == "python_grader_server_error":
                errors.python_grader_server_error_type = "start_failed"
            elif flag.startswith("model_grader_"):
                errors.model_grader_server_error_details = error.message
        finally:
            self._slots.release()
        elapsed = time.monotonic() - started
        report = grade.report
        tokens = report.prompt_tokens + report.completion_tokens
        usage: dict[str, Any] = {}
        if report.sampled_model_name is not None:
            usage[report.sampled_model_name] = {
                "prompt_tokens": report.prompt_tokens,
                "completion_tokens": report.completion_tokens,
                "total_tokens": tokens,
                "cached_tokens": 0,
            }
        return RunGraderResponse(
            reward=grade.reward,
            metadata=GraderRunMetadata(
                name=grader.name,
                type=grader.type,
                errors=errors,
                execution_time=elapsed,
                scores=dict(report.sub_rewards),
                token_usage=tokens if report.sampled_model_name is not None else None,
                sampled_model_name=report.sampled_model_name,
            ),
            sub_rewards=dict(report.sub_rewards),
            model_grader_token_usage_per_model=usage,
        )
