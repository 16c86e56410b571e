"""`score_model`: a model scores the answer. The grader's `input` messages, with their templates
rendered, are sent to `model` through an OpenAI-compatible endpoint (`GraderSettings.score_model_base_url`:
by default this very server, so a model it serves, built-in or fine-tuned, can grade) with the
unmodified `openai` SDK; the first number of the answer (or the `result` / `score` field of an answer
that is a JSON object) is the score, clamped to `range` (default [0, 1]).

Failures fail the grade with the hosted error flags: the endpoint unreachable or answering an error
(after the SDK's bounded retries, `score_model_retries`, each call limited to `score_model_timeout_s`)
`model_grader_server_error`; a refusal `model_grader_refusal_error`; an answer with no number
`model_grader_parse_error`.

Text content only (`input_text`, `output_text`, plain strings): images and audio are refused when the
grader is parsed, as the models this server serves read text.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tuneline.server.graders import template
from tuneline.server.graders.base import (
    Grade,
    GradeReport,
    GraderError,
    GraderSettings,
    refuse_unknown,
    require_string,
)

ROLES = ("user", "assistant", "system", "developer")
SAMPLING = ("seed", "top_p", "temperature", "max_completions_tokens", "reasoning_effort")
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def score_of(answer: str) -> float | None:
    """The score an answer gives: a JSON number, a JSON object's `result` / `score`, or its first number."""
    try:
        parsed = json.loads(answer)
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, Mapping):
        parsed = parsed.get("result", parsed.get("score"))
    if isinstance(parsed, int | float) and not isinstance(parsed, bool) and math.isfinite(parsed):
        return float(parsed)
    match = NUMBER.search(answer)
    if match is None:
        return None
    value = float(match.group(0))
    return value if math.isfinite(value) else None


@dataclass
class ScoreModelGrader:
    name: str
    model: str
    input: list[dict[str, Any]]  # messages with `content` normalised to a list of text parts
    sampling_params: dict[str, Any]
    range: tuple[float, float]
    given: dict[str, Any]  # the spec as given, shown back
    settings: GraderSettings = field(default_factory=GraderSettings)
    param: str = "grader"
    type: str = "score_model"
    _client: Any = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def client(self) -> Any:
        from openai import OpenAI

        with self._lock:
            if self._client is None:
                env = self.settings.score_model_api_key_env
                key = (os.environ.get(env) if env else None) or self.settings.score_model_api_key or "no-key"
                self._client = OpenAI(
                    base_url=self.settings.score_model_base_url,
                    api_key=key,
                    max_retries=self.settings.score_model_retries,
                    timeout=self.settings.score_model_timeout_s,
                )
            return self._client

    def messages(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> list[dict[str, str]]:
        rendered = []
        for index, message in enumerate(self.input):
            where = f"{self.param}.input[{index}].content"
            text = "\n".join(template.render(part, sample, item, where) for part in message["content"])
            rendered.append({"role": message["role"], "content": text})
        return rendered

    def evaluate(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> Grade:
        import openai

        messages = self.messages(sample, item)
        options: dict[str, Any] = {
            key: self.sampling_params[key]
            for key in ("seed", "top_p", "temperature", "reasoning_effort")
            if self.sampling_params.get(key) is not None
        }
        if self.sampling_params.get("max_completions_tokens") is not None:
            options["max_completion_tokens"] = self.sampling_params["max_completions_tokens"]
        where = f"{self.param}.model"
        try:
            response = self.client().chat.completions.create(model=self.model, messages=messages, **options)
        except openai.APIStatusError as error:
            detail = _error_message(error)
            raise GraderError(
                f"The score model {self.model!r} answered HTTP {error.status_code}: {detail}",
                where,
                kind="model_grader_server_error",
            ) from None
        except openai.APIError as error:
            raise GraderError(
                f"The score model endpoint {self.settings.score_model_base_url} could not be reached "
                f"({type(error).__name__}: {error}).",
                where,
                kind="model_grader_server_error",
            ) from None
        report = GradeReport(sampled_model_name=response.model)
        if response.usage is not None:
            report.prompt_tokens = response.usage.prompt_tokens or 0
            report.completion_tokens = response.usage.completion_tokens or 0
        choice = response.choices[0].message if response.choices else None
        if choice is not None and getattr(choice, "refusal", None):
            raise GraderError(
                f"The score model refused: {choice.refusal}",
                where,
                kind="model_grader_refusal_error",
                report=report,
            )
        answer = (choice.content if choice is not None else None) or ""
        score = score_of(answer)
        if score is None:
            shown = answer if len(answer) <= 200 else answer[:200] + "..."
            raise GraderError(
                f"The score model's answer holds no number: {shown!r}",
                where,
                kind="model_grader_parse_error",
                report=report,
            )
        low, high = self.range
        return Grade(min(high, max(low, score)), report)

    def grade(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> float:
        return self.evaluate(sample, item).reward

    def spec(self) -> dict[str, Any]:
        return dict(self.given)


def _error_message(error: Any) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):
            return str(inner["message"])
    return str(getattr(error, "message", error))


def _content(content: Any, where: str) -> list[str]:
    """A message's content as its text parts (templates unrendered)."""
    parts = content if isinstance(content, list) else [content]
    if not parts:
        raise GraderError(f"'{where}' is empty.", where)
    texts = []
    for index, part in enumerate(parts):
        at = f"{where}[{index}]" if isinstance(content, list) else where
        if isinstance(part, str):
            text = part
        elif isinstance(part, Mapping) and part.get("type") in ("input_text", "output_text"):
            value = part.get("text")
            if not isinstance(value, str):
                raise GraderError(f"Invalid type for '{at}.text': expected a string.", f"{at}.text")
            text = value
        elif isinstance(part, Mapping) and part.get("type") in ("input_image", "input_audio"):
            raise GraderError(
                f"Invalid value for '{at}.type': {part.get('type')} content is not supported on this server "
                "(its models read text); use input_text.",
                f"{at}.type",
            )
        else:
            raise GraderError(
                f"Invalid value for '{at}': expected a string or an input_text / output_text part.", at
            )
        template.check(text, at)
        texts.append(text)
    return texts


def parse(spec: Mapping[str, Any], param: str, settings: GraderSettings) -> ScoreModelGrader:
    refuse_unknown(spec, param, ("type", "name", "model", "input", "sampling_params", "range"))
    name = require_string(spec, "name", param)
    model = require_string(spec, "model", param)
    assert name is not None and model is not None
    given = spec.get("input")
    if not isinstance(given, list) or not given:
        raise GraderError(
            f"Invalid value for '{param}.input': expected a non-empty array of messages.", f"{param}.input"
        )
    messages = []
    for index, message in enumerate(given):
        where = f"{param}.input[{index}]"
        if not isinstance(message, Mapping):
            raise GraderError(f"Invalid type for '{where}': expected a message object.", where)
        refuse_unknown(message, where, ("role", "content", "type"))
        if message.get("type", "message") != "message":
            raise GraderError(f"Invalid value for '{where}.type': expected 'message'.", f"{where}.type")
        if message.get("role") not in ROLES:
            raise GraderError(
                f"Invalid value for '{where}.role': expected one of {', '.join(ROLES)}.", f"{where}.role"
            )
        if "content" not in message:
            raise GraderError(f"Missing required parameter: '{where}.content'.", f"{where}.content")
        messages.append(
            {"role": message["role"], "content": _content(message["content"], f"{where}.content")}
        )
    sampling = spec.get("sampling_params") or {}
    if not isinstance(sampling, Mapping):
        raise GraderError(
            f"Invalid type for '{param}.sampling_params': expected an object.", f"{param}.sampling_params"
        )
    refuse_unknown(sampling, f"{param}.sampling_params", SAMPLING)
    for key in ("seed", "max_completions_tokens"):
        value = sampling.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < (key != "seed")
        ):
            where = f"{param}.sampling_params.{key}"
            raise GraderError(
                f"Invalid value for '{where}': expected an integer >= {int(key != 'seed')}.", where
            )
    for key in ("temperature", "top_p"):
        value = sampling.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
            where = f"{param}.sampling_params.{key}"
            raise GraderError(f"Invalid value for '{where}': expected a number >= 0.", where)
    bounds = spec.get("range", [0, 1])
    if (
        not isinstance(bounds, list)
        or len(bounds) != 2
        or not all(
            isinstance(b, int | float) and not isinstance(b, bool) and math.isfinite(b) for b in bounds
        )
        or bounds[0] >= bounds[1]
    ):
        raise GraderError(
            f"Invalid value for '{param}.range': expected [low, high] with low < high.", f"{param}.range"
        )
    if not settings.score_model_base_url:
        raise GraderError(
            f"Invalid value for '{param}.type': score_model graders need a model endpoint, and none is "
            "configured on this server (set TUNELINE_SCORE_MODEL_BASE_URL).",
            f"{param}.type",
        )
    return ScoreModelGrader(
        name,
        model,
        messages,
        dict(sampling),
        (float(bounds[0]), float(bounds[1])),
        dict(spec),
        settings,
        param,
    )
