"""Graders of reinforcement fine-tuning, with the hosted API's semantics (shared/spec/openai-openapi.yaml,
`Grader*` schemas): `string_check`, `text_similarity`, `python`, `score_model` and `multi`.

`parse_grader(spec)` validates a grader spec and returns a `Grader`; `grader.grade(sample, item)`
scores one model answer (`sample = {"output_text": str, "output_json": object | None}`, built by
`sample_of(text)`) against one dataset line (`item`). Both raise `GraderError(message, param)`.
`grade_many(grader, pairs)` grades many at once (python graders in one child process), each failed
grade returned as its GraderError.
The server's `/v1/fine_tuning/alpha/graders/run` and `/validate` (tuneline/server/services/graders.py)
and the reinforcement trainer use this package.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tuneline.server.graders import multi, python_grader, score_model, string_check, text_similarity
from tuneline.server.graders.base import (
    Grade,
    Grader,
    GradeReport,
    GraderError,
    GraderSettings,
    Pair,
    grade_many,
    require_object,
)
from tuneline.server.graders.template import sample_of

__all__ = [
    "TYPES",
    "Grade",
    "GradeReport",
    "Grader",
    "GraderError",
    "GraderSettings",
    "Pair",
    "grade_many",
    "parse_grader",
    "sample_of",
]

TYPES = ("string_check", "text_similarity", "python", "score_model", "multi")


def parse_grader(
    spec: Mapping[str, Any], param: str = "grader", settings: GraderSettings | None = None
) -> Grader:
    """The grader `spec` describes, validated whole; GraderError names the first wrong field."""
    settings = settings or GraderSettings()
    spec = require_object(spec, param)
    kind = spec.get("type")
    if kind is None:
        raise GraderError(f"Missing required parameter: '{param}.type'.", f"{param}.type")
    if kind == "string_check":
        return string_check.parse(spec, param)
    if kind == "text_similarity":
        return text_similarity.parse(spec, param)
    if kind == "python":
        return python_grader.parse(spec, param, settings)
    if kind == "score_model":
        return score_model.parse(spec, param, settings)
    if kind == "multi":
        return multi.parse(spec, param, lambda sub, where: parse_grader(sub, where, settings))
    if kind == "label_model":
        raise GraderError(
            f"Invalid value for '{param}.type': label_model graders are for evals; fine-tuning takes "
            f"{', '.join(TYPES)}.",
            f"{param}.type",
        )
    raise GraderError(
        f"Invalid value for '{param}.type': {kind!r} is not one of {', '.join(TYPES)}.", f"{param}.type"
    )
