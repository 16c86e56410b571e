"""What every grader shares: the error a bad grader (or a failing grade) raises, the settings the
server gives graders, the `Grader` protocol, and the small checks `parse_grader` runs on a spec.

A grader spec is the JSON object of the hosted API's `Grader*` schemas (shared/spec/openai-openapi.yaml).
Parsing validates it whole, so a bad grader is refused before a job starts (or by `/validate`) with
the param path of the wrong field (`grader.operation`, `grader.graders.accuracy.source`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class GraderError(Exception):
    """A grader that is not valid (raised by `parse_grader`), or a grade that could not be computed
    (raised by `Grader.grade`). `param` is the path of what is wrong (`grader.operation`); `kind` names
    the hosted metadata error flag a failed grade sets (`python_grader_runtime_error`,
    `model_grader_server_error`, `invalid_variable_error`, ...), None for an invalid grader."""

    def __init__(
        self, message: str, param: str, kind: str | None = None, report: GradeReport | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.kind = kind
        # What the failed grade still used (a score model's tokens when its answer held no number).
        self.report = report


@dataclass
class GraderSettings:
    """What graders need from the server. `score_model_base_url`: the OpenAI-compatible endpoint a
    `score_model` grader calls (None: score_model graders are refused); `score_model_api_key_env`: the
    environment variable holding its key (None: no key). `python_*`: the limits of a `python` grader."""

    score_model_base_url: str | None = None
    score_model_api_key_env: str | None = None
    python_timeout_s: float = 10
    python_memory_mb: int = 512
    score_model_timeout_s: float = 60
    score_model_retries: int = 2
    # The endpoint's key itself, where it is not in an environment variable (this server's own key);
    # never shown (repr) or logged.
    score_model_api_key: str | None = field(default=None, repr=False)


@dataclass
class GradeReport:
    """What one grade left besides its reward: the scores of the sub-graders of a `multi`, the tokens a
    `score_model` used and the model that answered."""

    sub_rewards: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    sampled_model_name: str | None = None


@dataclass
class Grade:
    """One grade: the reward and what it left (`GradeReport`)."""

    reward: float
    report: GradeReport = field(default_factory=GradeReport)


class Grader(Protocol):
    name: str
    type: str

    def grade(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> float:
        """The reward of one answer; GraderError when it cannot be computed."""
        ...

    def evaluate(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> Grade:
        """The reward with its report (sub-rewards, tokens used); GraderError as `grade`."""
        ...

    def spec(self) -> dict[str, Any]:
        """The grader as the API shows it back (the validated spec)."""
        ...


Pair = tuple[Mapping[str, Any], Mapping[str, Any]]


def grade_many(grader: Grader, pairs: list[Pair]) -> list[Grade | GraderError]:
    """Grade many (sample, item) pairs: a grader that can batch (`evaluate_many`: python graders run
    them in one child process, multi graders batch their sub-graders) does, the others grade one by one.
    A failed grade is its GraderError in the list, not raised."""
    batch = getattr(grader, "evaluate_many", None)
    if batch is not None:
        return batch(pairs)  # type: ignore[no-any-return]
    outcomes: list[Grade | GraderError] = []
    for sample, item in pairs:
        try:
            outcomes.append(grader.evaluate(sample, item))
        except GraderError as error:
            outcomes.append(error)
    return outcomes


def require_object(spec: Any, param: str) -> Mapping[str, Any]:
    if not isinstance(spec, Mapping):
        raise GraderError(f"Invalid type for '{param}': expected an object.", param)
    return spec


def require_string(spec: Mapping[str, Any], key: str, param: str, *, required: bool = True) -> str | None:
    value = spec.get(key)
    if value is None:
        if required:
            raise GraderError(f"Missing required parameter: '{param}.{key}'.", f"{param}.{key}")
        return None
    if not isinstance(value, str):
        raise GraderError(f"Invalid type for '{param}.{key}': expected a string.", f"{param}.{key}")
    return value


def require_choice(spec: Mapping[str, Any], key: str, param: str, choices: tuple[str, ...]) -> str:
    value = require_string(spec, key, param)
    assert value is not None
    if value not in choices:
        raise GraderError(
            f"Invalid value for '{param}.{key}': {value!r} is not one of {', '.join(choices)}.",
            f"{param}.{key}",
        )
    return value


def refuse_unknown(spec: Mapping[str, Any], param: str, known: tuple[str, ...]) -> None:
    for key in spec:
        if key not in known:
            raise GraderError(
                f"Unknown parameter: '{param}.{key}' (a {spec.get('type')} grader takes {', '.join(known)}).",
                f"{param}.{key}",
            )
