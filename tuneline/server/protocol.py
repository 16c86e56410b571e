"""The wire protocol of `tuneline serve`: a pydantic model for every request and response it speaks,
written from OpenAI's OpenAPI contract (the schemas it speaks are kept, pruned, in
tests/server/openapi/), and the one translation of a validation error into OpenAI's error shape.

Requests are validated strictly, as the hosted API does: no coercion (`"5"` is not 5, `true` is not 1),
and an unknown field is refused, in the wording of the endpoint's hosted counterpart
(`{path}: extra inputs are not permitted` for fine-tuning, `Unrecognized request argument supplied:
{path}` for chat). A rule whose hosted wording tells more than "invalid" raises `invalid(...)` with
the message the client sees; `{path}` in a message is the field's place in the body
(`messages[0].role`, `method.supervised.hyperparameters.n_epochs`).

Responses are built with every field the contract requires; `Omittable` names the fields the hosted
service leaves out of the body when it has nothing for them (a stream chunk's `usage`, a delta's
`role`). `wire(model)` is the JSON sent.

Where the hosted service departs from the published schema, these models follow the service
(shared/spec/fine-tuning-api.md): a job can be `paused`; jobs carry `user_provided_suffix`; an empty
file list has null `first_id` and `last_id`.

One module of declarations (~950 lines) on purpose: every body the wire carries, with the rules of
each request field beside it, so a field of the API is added, and read, in one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

from tuneline.server.logs import has_control_characters

MAX_SEED = 2**31 - 1
# The contract and the hosted documentation bound the multiplier below only (> 0); this server also
# bounds it above, at ten times the model's own rate: a rate thousands of times higher diverges within
# a few steps (the loss turns NaN) and only wastes the job.
MAX_LEARNING_RATE_MULTIPLIER = 10.0
MAX_METADATA_PAIRS = 16
METHODS = ("supervised", "dpo", "reinforcement")
REASONING_EFFORTS = ("default", "low", "medium", "high")
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# Purposes a client may upload with; `fine-tune-results` files are written by the server only.
UPLOAD_PURPOSES = ("fine-tune", "assistants", "batch", "vision", "user_data")
JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"]


def invalid(message: str, *, param: str | None = None, code: str | None = None) -> PydanticCustomError:
    """A validation error with the message the client sees; `{path}` in it is the field's place in
    the body, `param` overrides that place (for rules that span fields), `code` is the error code."""
    context: dict[str, Any] = {}
    if param is not None:
        context["field"] = param
    if code is not None:
        context["code"] = code
    return PydanticCustomError("invalid_value", message, context)


def missing(detail: str = "") -> PydanticCustomError:
    """A required parameter that is absent or null (`detail` adds how to give it)."""
    return PydanticCustomError("missing", "Missing required parameter: '{path}'" + detail + ".")


def shown(value: Any, limit: int = 60) -> str:
    """A short repr of a client's value for an error message (a huge value is cut, never echoed whole)."""
    if isinstance(value, str | int | float | bool) or value is None:
        text = repr(value)
    else:
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class RequestBody(BaseModel):
    """A request body: strict types, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    # The hosted wording for an unknown field, and its error code.
    unknown_field: ClassVar[tuple[str, str]] = ("{path}: extra inputs are not permitted", "extra_inputs")


# -- fine-tuning jobs -------------------------------------------------------------------------------


def _auto_or_int(name: str, low: int, high: int) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is None or (isinstance(value, str) and value == "auto"):
            return "auto"
        if _is_int(value) and low <= value <= high:
            return value
        raise invalid(f"{name} must be 'auto' or an integer between {low} and {high}, got {shown(value)}.")

    return check


def _learning_rate_multiplier(value: Any) -> Any:
    if value is None or (isinstance(value, str) and value == "auto"):
        return "auto"
    if _is_number(value) and 0 < value <= MAX_LEARNING_RATE_MULTIPLIER:
        return float(value)
    raise invalid(
        "learning_rate_multiplier must be 'auto' or a number greater than 0 and at most "
        f"{MAX_LEARNING_RATE_MULTIPLIER:g}, got {shown(value)}."
    )


Epochs = Annotated[Literal["auto"] | int, BeforeValidator(_auto_or_int("n_epochs", 1, 50))]
BatchSize = Annotated[Literal["auto"] | int, BeforeValidator(_auto_or_int("batch_size", 1, 256))]
LearningRateMultiplier = Annotated[Literal["auto"] | float, BeforeValidator(_learning_rate_multiplier)]


class SupervisedHyperparameters(RequestBody):
    n_epochs: Epochs = "auto"
    batch_size: BatchSize = "auto"
    learning_rate_multiplier: LearningRateMultiplier = "auto"


def _beta(value: Any) -> Any:
    if value is None or (isinstance(value, str) and value == "auto"):
        return "auto"
    if _is_number(value) and 0 < value <= 2:
        return float(value)
    raise invalid(f"beta must be 'auto' or a number greater than 0 and at most 2, got {shown(value)}.")


def _compute_multiplier(value: Any) -> Any:
    if value is None or (isinstance(value, str) and value == "auto"):
        return "auto"
    if _is_number(value) and 0.00001 <= value <= 10:
        return float(value)
    raise invalid(
        f"compute_multiplier must be 'auto' or a number between 0.00001 and 10, got {shown(value)}."
    )


def _reasoning_effort(value: Any) -> Any:
    if value is None:
        return "default"
    if isinstance(value, str) and value in REASONING_EFFORTS:
        return value
    raise invalid(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {shown(value)}.")


Beta = Annotated[Literal["auto"] | float, BeforeValidator(_beta)]
ComputeMultiplier = Annotated[Literal["auto"] | float, BeforeValidator(_compute_multiplier)]
# The contract bounds these below only; above, this server stops at what one job can sensibly run.
EvalInterval = Annotated[Literal["auto"] | int, BeforeValidator(_auto_or_int("eval_interval", 1, 1_000_000))]
EvalSamples = Annotated[Literal["auto"] | int, BeforeValidator(_auto_or_int("eval_samples", 1, 1000))]
ReasoningEffort = Annotated[str, BeforeValidator(_reasoning_effort)]


class DPOHyperparameters(SupervisedHyperparameters):
    """Contract: FineTuneDPOHyperparameters."""

    beta: Beta = "auto"


class ReinforcementHyperparameters(SupervisedHyperparameters):
    """Contract: FineTuneReinforcementHyperparameters. `reasoning_effort` is accepted and reported; a
    model of this server has no reasoning mode, so it changes nothing."""

    reasoning_effort: ReasoningEffort = "default"
    compute_multiplier: ComputeMultiplier = "auto"
    eval_interval: EvalInterval = "auto"
    eval_samples: EvalSamples = "auto"


def _method_type(value: Any) -> Any:
    if value is None:
        raise missing()
    if not isinstance(value, str) or value not in METHODS:
        raise invalid(f"method.type must be one of {', '.join(METHODS)}, got {shown(value)}.")
    return value


def _grader(value: Any) -> Any:
    if value is None:
        raise missing(
            ": a reinforcement job needs a grader (string_check, text_similarity, python, score_model or multi)"
        )
    if not isinstance(value, dict):
        raise invalid(
            "method.reinforcement.grader must be an object, got {shown}.".replace("{shown}", shown(value))
        )
    return value


class SupervisedMethod(RequestBody):
    hyperparameters: SupervisedHyperparameters | None = None


class DPOMethod(RequestBody):
    """Contract: FineTuneDPOMethod."""

    hyperparameters: DPOHyperparameters | None = None


class ReinforcementMethod(RequestBody):
    """Contract: FineTuneReinforcementMethod. The grader is checked by tuneline/server/graders
    (parse_grader) when the job is created, so a bad one is a 400 naming its place."""

    grader: Annotated[dict[str, Any], BeforeValidator(_grader)]
    hyperparameters: ReinforcementHyperparameters | None = None


class FineTuneMethod(RequestBody):
    """Contract: FineTuneMethod: `type` and the settings of that type only."""

    type: Annotated[Literal["supervised", "dpo", "reinforcement"], BeforeValidator(_method_type)]
    supervised: SupervisedMethod | None = None
    dpo: DPOMethod | None = None
    reinforcement: ReinforcementMethod | None = None

    @model_validator(mode="after")
    def _settings_of_its_type_only(self) -> FineTuneMethod:
        for other in METHODS:
            if other != self.type and getattr(self, other) is not None:
                raise invalid(
                    f"method.{other} does not go with method.type '{self.type}': pass method.{self.type}.",
                    param=f"method.{other}",
                )
        if self.type == "reinforcement" and self.reinforcement is None:
            raise invalid(
                "Missing required parameter: 'method.reinforcement': a reinforcement job needs "
                "method.reinforcement.grader.",
                param="method.reinforcement",
                code="missing_required_parameter",
            )
        return self

    def hyperparameters(self) -> SupervisedHyperparameters | None:
        settings = getattr(self, self.type)
        return settings.hyperparameters if settings is not None else None


def _required_string(name: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is None:
            raise missing()
        if not isinstance(value, str) or not value:
            raise invalid(f"'{name}' must be a non-empty string.")
        return value

    return check


def _file_id(value: Any) -> Any:
    if value is not None and (not isinstance(value, str) or not value):
        raise invalid("'{path}' must be a file id.")
    return value


def _suffix(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 64:
        raise invalid("suffix must be a string of 1 to 64 characters.")
    if ":" in value or any(ch.isspace() for ch in value) or has_control_characters(value):
        raise invalid(
            "suffix must not contain ':', whitespace or control characters: it becomes part of the model "
            "name ft:{base}:{org}:{suffix}:{id}."
        )
    return value


def _seed(value: Any) -> Any:
    if value is not None and not (_is_int(value) and 0 <= value <= MAX_SEED):
        raise invalid(f"seed must be an integer between 0 and {MAX_SEED}, got {shown(value)}.")
    return value


def _metadata(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid("metadata must be an object of string keys and string values.")
    if len(value) > MAX_METADATA_PAIRS:
        raise invalid(f"metadata has {len(value)} pairs; at most {MAX_METADATA_PAIRS} are allowed.")
    for key, item in value.items():
        if len(key) > 64:
            raise invalid(f"metadata key {shown(key[:20])}... is longer than 64 characters.")
        if not isinstance(item, str):
            raise invalid(f"metadata[{shown(key)}] must be a string, got {type(item).__name__}.")
        if len(item) > 512:
            raise invalid(f"metadata[{shown(key)}] is longer than 512 characters.")
        if "\x00" in key or "\x00" in item:
            raise invalid(f"metadata[{shown(key)}] holds a NUL character, which metadata must not contain.")
    return value


def _integrations(value: Any) -> Any:
    if value not in (None, []):
        raise invalid(
            "integrations are not supported by this server (it sends no data anywhere): remove `integrations`."
        )
    return value


class CreateFineTuningJobRequest(RequestBody):
    """POST /v1/fine_tuning/jobs (contract: CreateFineTuningJobRequest)."""

    model: Annotated[str, BeforeValidator(_required_string("model"))]
    training_file: Annotated[str, BeforeValidator(_required_string("training_file"))]
    hyperparameters: SupervisedHyperparameters | None = None
    suffix: Annotated[str | None, BeforeValidator(_suffix)] = None
    validation_file: Annotated[str | None, BeforeValidator(_file_id)] = None
    integrations: Annotated[list[Any] | None, BeforeValidator(_integrations)] = None
    seed: Annotated[int | None, BeforeValidator(_seed)] = None
    method: FineTuneMethod | None = None
    metadata: Annotated[dict[str, str] | None, BeforeValidator(_metadata)] = None

    @model_validator(mode="after")
    def _hyperparameters_in_one_place(self) -> CreateFineTuningJobRequest:
        if self.hyperparameters is None:
            return self
        if self.method_type != "supervised":
            raise invalid(
                f"The top-level hyperparameters are for supervised jobs only: pass them in "
                f"method.{self.method_type}.hyperparameters.",
                param="hyperparameters",
            )
        if self._method_hyperparameters() is not None:
            raise invalid(
                "Pass hyperparameters either in method.supervised.hyperparameters or in the deprecated "
                "top-level hyperparameters, not both.",
                param="hyperparameters",
            )
        return self

    @property
    def method_type(self) -> str:
        return self.method.type if self.method is not None else "supervised"

    def _method_hyperparameters(self) -> SupervisedHyperparameters | None:
        return self.method.hyperparameters() if self.method is not None else None

    def requested_hyperparameters(self) -> dict[str, Any]:
        """The method's hyperparameters as asked ("auto" where not given): n_epochs, batch_size,
        learning_rate_multiplier, and beta (dpo) or the reinforcement ones."""
        default: SupervisedHyperparameters = {
            "supervised": SupervisedHyperparameters,
            "dpo": DPOHyperparameters,
            "reinforcement": ReinforcementHyperparameters,
        }[self.method_type]()
        chosen = self._method_hyperparameters() or self.hyperparameters or default
        return chosen.model_dump()

    def method_record(self) -> dict[str, Any]:
        """What the job keeps of its method besides the hyperparameters: the type, and a
        reinforcement job's grader."""
        record: dict[str, Any] = {"type": self.method_type}
        if self.method is not None and self.method.reinforcement is not None:
            record["grader"] = self.method.reinforcement.grader
        return record


class ListQuery(BaseModel):
    """`after` and `limit` of a paginated list (query parameters; unknown ones are ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    max_limit: ClassVar[int] = 1000
    after: str | None = None
    limit: int = 20

    @model_validator(mode="before")
    @classmethod
    def _limit_in_range(cls, values: Any) -> Any:
        raw = values.get("limit") if isinstance(values, Mapping) else None
        if raw is None:
            return values
        try:
            limit = int(raw)
        except (TypeError, ValueError):
            raise invalid(
                f"limit must be an integer between 1 and {cls.max_limit}, got {shown(raw)}.", param="limit"
            ) from None
        if not 1 <= limit <= cls.max_limit:
            raise invalid(f"limit must be between 1 and {cls.max_limit}, got {limit}.", param="limit")
        return {**values, "limit": limit}


class ListJobsQuery(ListQuery):
    pass


class ListEventsQuery(ListQuery):
    pass


class ListCheckpointsQuery(ListQuery):
    limit: int = 10


def _order(value: Any) -> Any:
    if value not in ("asc", "desc"):
        raise invalid(f"order must be 'asc' or 'desc', got {shown(value)}.")
    return value


class ListFilesQuery(ListQuery):
    max_limit: ClassVar[int] = 10000
    limit: int = 10000
    purpose: str | None = None
    order: Annotated[Literal["asc", "desc"], BeforeValidator(_order)] = "desc"


def _purpose(value: Any) -> Any:
    if not isinstance(value, str) or not value:
        raise missing()
    if value not in UPLOAD_PURPOSES:
        raise invalid(f"'{value}' is not one of {list(UPLOAD_PURPOSES)} - 'purpose'", code="invalid_purpose")
    return value


def _upload(value: Any) -> Any:
    if value is None or isinstance(value, str):
        raise missing()
    return value


class CreateFileRequest(BaseModel):
    """POST /v1/files, a multipart form (contract: CreateFileRequest); other form fields are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True, arbitrary_types_allowed=True)
    purpose: Annotated[str, BeforeValidator(_purpose)]
    file: Annotated[Any, BeforeValidator(_upload)]


# -- chat completions -------------------------------------------------------------------------------


def _role(value: Any) -> Any:
    if not isinstance(value, str) or value not in CHAT_ROLES:
        raise invalid(f"{{path}} must be one of {', '.join(CHAT_ROLES)}.")
    return value


def _content(value: Any) -> Any:
    if value is not None and not isinstance(value, str | list):
        raise invalid("{path} must be a string or a list of content parts.")
    return value


def message_words(content: Any) -> str:
    """The lower-cased text of a message's content (a string, or the text of its content parts)."""
    if isinstance(content, str):
        return content.lower()
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict)).lower()
    return ""


class ChatMessage(BaseModel):
    """One message of a chat request; keys this server has no use for (name, tool_calls...) pass."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    role: Annotated[str, BeforeValidator(_role)]
    content: Annotated[Any, BeforeValidator(_content)] = None


def _model_name(value: Any) -> Any:
    if not isinstance(value, str) or not value:
        raise missing()
    return value


def _messages(value: Any) -> Any:
    if not isinstance(value, list) or not value:
        raise missing(" (a non-empty list of messages)")
    return value


def _number(name: str, low: float, high: float) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is None:
            return None
        if not (_is_number(value) and low <= value <= high):
            raise invalid(f"{name} must be a number between {low:g} and {high:g}, got {shown(value)}.")
        return float(value)

    return check


def _token_limit(value: Any) -> Any:
    if value is not None and not (_is_int(value) and value >= 1):
        raise invalid(f"{{path}} must be an integer >= 1, got {shown(value)}.")
    return value


def _stop(value: Any) -> Any:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or not 1 <= len(stops) <= 4
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise invalid("stop must be a string or a list of 1 to 4 non-empty strings.")
    return stops


def _chat_seed(value: Any) -> Any:
    if value is not None and not _is_int(value):
        raise invalid(f"seed must be an integer, got {shown(value)}.")
    return value


# Choices of one request are decoded as rows of one batch (tuneline/server/modeling.py BatchedDecoder).
MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20  # the contract's bound


def _n(value: Any) -> Any:
    if value is not None and not (_is_int(value) and 1 <= value <= MAX_CHOICES):
        raise invalid(f"n must be an integer between 1 and {MAX_CHOICES} on this server, got {shown(value)}.")
    return value


def _logprobs(value: Any) -> Any:
    if value is not None and not isinstance(value, bool):
        raise invalid(f"logprobs must be true or false, got {shown(value)}.")
    return value


def _top_logprobs(value: Any) -> Any:
    if value is not None and not (_is_int(value) and 0 <= value <= MAX_TOP_LOGPROBS):
        raise invalid(
            f"top_logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}, got {shown(value)}."
        )
    return value


def _response_format(value: Any) -> Any:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in ("text", "json_object"):
        return kind
    if kind == "json_schema":
        raise invalid(
            "response_format type 'json_schema' is not supported by this server: use {'type': 'json_object'}.",
            code="unsupported_parameter",
        )
    raise invalid("response_format must be {'type': 'text'} or {'type': 'json_object'}.")


def _stream(value: Any) -> Any:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid("stream must be true or false.")
    return value


def _stream_options(value: Any) -> Any:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid("stream_options must be an object.")
    return value


def _unsupported(value: Any) -> Any:
    if value not in (None, [], {}):
        raise invalid("'{path}' is not supported by this server.", code="unsupported_parameter")
    return value


Unsupported = Annotated[Any, BeforeValidator(_unsupported)]
NoEffect = Any  # accepted as the hosted API accepts it; it changes nothing here


class CreateChatCompletionRequest(RequestBody):
    """POST /v1/chat/completions (contract: CreateChatCompletionRequest)."""

    unknown_field: ClassVar[tuple[str, str]] = (
        "Unrecognized request argument supplied: {path}",
        "unknown_parameter",
    )

    model: Annotated[str, BeforeValidator(_model_name)]
    messages: Annotated[list[ChatMessage], BeforeValidator(_messages)]
    temperature: Annotated[float | None, BeforeValidator(_number("temperature", 0.0, 2.0))] = None
    top_p: Annotated[float | None, BeforeValidator(_number("top_p", 0.0, 1.0))] = None
    max_tokens: Annotated[int | None, BeforeValidator(_token_limit)] = None
    max_completion_tokens: Annotated[int | None, BeforeValidator(_token_limit)] = None
    stop: Annotated[list[str] | None, BeforeValidator(_stop)] = None
    seed: Annotated[int | None, BeforeValidator(_chat_seed)] = None
    n: Annotated[int | None, BeforeValidator(_n)] = None
    stream: Annotated[bool, BeforeValidator(_stream)] = False
    stream_options: Annotated[dict[str, Any], BeforeValidator(_stream_options)] = {}
    logprobs: Annotated[bool | None, BeforeValidator(_logprobs)] = None
    top_logprobs: Annotated[int | None, BeforeValidator(_top_logprobs)] = None
    # "text" or "json_object" (the `type` of the request's object).
    response_format: Annotated[str | None, BeforeValidator(_response_format)] = None
    user: NoEffect = None
    metadata: NoEffect = None
    store: NoEffect = None
    frequency_penalty: NoEffect = None
    presence_penalty: NoEffect = None
    logit_bias: NoEffect = None
    service_tier: NoEffect = None
    parallel_tool_calls: NoEffect = None
    prompt_cache_key: NoEffect = None
    safety_identifier: NoEffect = None
    reasoning_effort: NoEffect = None
    verbosity: NoEffect = None
    tools: Unsupported = None
    tool_choice: Unsupported = None
    functions: Unsupported = None
    function_call: Unsupported = None
    audio: Unsupported = None
    modalities: Unsupported = None
    prediction: Unsupported = None
    web_search_options: Unsupported = None

    @model_validator(mode="after")
    def _combinations(self) -> CreateChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs requires logprobs to be true.", param="top_logprobs")
        if self.stream and self.response_format == "json_object":
            raise invalid(
                "stream is not supported with response_format json_object on this server (an answer is "
                "checked whole before it is sent): send the request without stream.",
                param="stream",
                code="unsupported_parameter",
            )
        if self.response_format == "json_object" and not any(
            "json" in message_words(m.content) for m in self.messages
        ):
            # The hosted rule: the instruction to answer in JSON is in the prompt, not only in the option.
            raise invalid(
                "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
                "'json_object'.",
                param="messages",
            )
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def top_logprob_count(self) -> int | None:
        """None without logprobs; else how many alternatives to report for each token (0 or more)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options.get("include_usage"))


# -- responses --------------------------------------------------------------------------------------


class ResponseBody(BaseModel):
    """A response body: every field is sent, null included, except the `omittable` ones left unset."""

    model_config = ConfigDict(extra="forbid")
    omittable: ClassVar[frozenset[str]] = frozenset()

    def model_post_init(self, context: Any, /) -> None:
        self.model_fields_set.update(name for name in type(self).model_fields if name not in self.omittable)


def wire(body: ResponseBody) -> bytes:
    """The JSON of a response body."""
    return body.model_dump_json(exclude_unset=True).encode()


class ErrorObject(ResponseBody):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(ResponseBody):
    error: ErrorObject


class FileObject(ResponseBody):
    """Contract: OpenAIFile."""

    object: Literal["file"] = "file"
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]


class ListFilesResponse(ResponseBody):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class DeleteFileResponse(ResponseBody):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class JobError(ResponseBody):
    code: str
    message: str
    param: str | None


class JobHyperparameters(ResponseBody):
    n_epochs: Literal["auto"] | int
    batch_size: Literal["auto"] | int
    learning_rate_multiplier: Literal["auto"] | float


class JobDPOHyperparameters(JobHyperparameters):
    beta: Literal["auto"] | float


class JobReinforcementHyperparameters(JobHyperparameters):
    reasoning_effort: str
    compute_multiplier: Literal["auto"] | float
    eval_interval: Literal["auto"] | int
    eval_samples: Literal["auto"] | int


class JobSupervisedMethod(ResponseBody):
    hyperparameters: JobHyperparameters


class JobDPOMethod(ResponseBody):
    hyperparameters: JobDPOHyperparameters


class JobReinforcementMethod(ResponseBody):
    grader: dict[str, Any]
    hyperparameters: JobReinforcementHyperparameters


class JobMethod(ResponseBody):
    """The method a job reports: its type and that type's settings only (the others left out)."""

    omittable: ClassVar[frozenset[str]] = frozenset({"supervised", "dpo", "reinforcement"})
    type: Literal["supervised", "dpo", "reinforcement"] = "supervised"
    supervised: JobSupervisedMethod | None = None
    dpo: JobDPOMethod | None = None
    reinforcement: JobReinforcementMethod | None = None


class FineTuningJob(ResponseBody):
    """Contract: FineTuningJob."""

    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: JobHyperparameters
    model: str
    organization_id: str
    result_files: list[str]
    status: JobStatus
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    integrations: list[Any]
    seed: int
    estimated_finish: int | None
    method: JobMethod
    metadata: dict[str, str] | None
    user_provided_suffix: str | None


class ListPaginatedFineTuningJobsResponse(ResponseBody):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(ResponseBody):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any]


class ListFineTuningJobEventsResponse(ResponseBody):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class FineTuningJobCheckpoint(ResponseBody):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, int | float]
    step_number: int


class ListFineTuningJobCheckpointsResponse(ResponseBody):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    has_more: bool
    first_id: str | None
    last_id: str | None


class Model(ResponseBody):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ListModelsResponse(ResponseBody):
    object: Literal["list"] = "list"
    data: list[Model]


class DeleteModelResponse(ResponseBody):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


class PromptTokensDetails(ResponseBody):
    cached_tokens: int = 0
    audio_tokens: int = 0


class CompletionTokensDetails(ResponseBody):
    reasoning_tokens: int = 0
    audio_tokens: int = 0
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class CompletionUsage(ResponseBody):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails

    @classmethod
    def of(cls, prompt: int, completion: int) -> CompletionUsage:
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(),
            completion_tokens_details=CompletionTokensDetails(),
        )


FinishReason = Literal["stop", "length"]


class ChatCompletionMessage(ResponseBody):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None
    annotations: list[Any] = []


class TopLogprob(ResponseBody):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatCompletionTokenLogprob(ResponseBody):
    """Contract: ChatCompletionTokenLogprob (one answer token, its logprob and the likeliest others)."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(ResponseBody):
    content: list[ChatCompletionTokenLogprob] | None
    refusal: list[ChatCompletionTokenLogprob] | None = None


class ChatCompletionChoice(ResponseBody):
    index: int = 0
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class CreateChatCompletionResponse(ResponseBody):
    """Contract: CreateChatCompletionResponse."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage
    service_tier: str = "default"
    system_fingerprint: str = "fp_tuneline"


class ChatCompletionDelta(ResponseBody):
    omittable: ClassVar[frozenset[str]] = frozenset({"role", "content"})
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionChunkChoice(ResponseBody):
    index: int = 0
    delta: ChatCompletionDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class CreateChatCompletionStreamResponse(ResponseBody):
    """Contract: CreateChatCompletionStreamResponse (one chunk of a stream)."""

    omittable: ClassVar[frozenset[str]] = frozenset({"usage"})
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str = "fp_tuneline"
    choices: list[ChatCompletionChunkChoice]
    usage: CompletionUsage | None = None


# -- validation errors in OpenAI's shape ------------------------------------------------------------

REQUESTS: dict[str, type[BaseModel]] = {
    model.__name__: model
    for model in (
        CreateFineTuningJobRequest,
        CreateChatCompletionRequest,
        CreateFileRequest,
        ListJobsQuery,
        ListEventsQuery,
        ListCheckpointsQuery,
        ListFilesQuery,
    )
}
# Where FastAPI puts a parameter, not part of its name.
_LOCATIONS = frozenset({"body", "query", "path", "header", "form"})
# The hosted names for JSON types, for "Invalid type for 'x': expected ..., but got ... instead."
_TYPE_NAMES = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def path_of(location: Sequence[Any]) -> str:
    """`('messages', 0, 'role')` -> `messages[0].role`."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part not in _LOCATIONS:
            text += f".{part}" if text else str(part)
    return text


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def error_of(errors: Iterable[Mapping[str, Any]], model: str | None) -> ErrorResponse:
    """The OpenAI error for the first problem of a validation (unknown fields first, then missing
    ones, then the rest, each in the body's order)."""
    listed = list(errors)
    rank = {"extra_forbidden": 0, "missing": 1}
    first = min(listed, key=lambda e: rank.get(str(e.get("type")), 2)) if listed else {}
    kind = str(first.get("type", ""))
    context = first.get("ctx") or {}
    path = str(context.get("field") or path_of(first.get("loc", ())))
    code: str | None = context.get("code")
    if kind == "extra_forbidden":
        wording, code = REQUESTS.get(model or "", RequestBody).unknown_field  # type: ignore[attr-defined]
        message = wording.replace("{path}", path)
    elif kind == "missing":
        text = str(first.get("msg", ""))
        message = (
            text if text.startswith("Missing required parameter") else "Missing required parameter: '{path}'."
        )
        message = message.replace("{path}", path)
        code = "missing_required_parameter"
    elif kind == "invalid_value":
        message = str(first.get("msg", "")).replace("{path}", path)
    elif kind in _TYPE_NAMES and not path:
        message = f"The request body must be a JSON object, but got {_json_type(first.get('input'))} instead."
        code = "invalid_type"
    elif kind in _TYPE_NAMES:
        message = (
            f"Invalid type for '{path}': expected {_TYPE_NAMES[kind]}, "
            f"but got {_json_type(first.get('input'))} instead."
        )
        code = "invalid_type"
    elif kind == "literal_error":
        message = f"Invalid value for '{path}': {first.get('msg', 'not one of the allowed values')}."
        code = "invalid_value"
    else:
        message = f"Invalid value for '{path or 'request'}': {first.get('msg', 'invalid')}."
    return ErrorResponse(
        error=ErrorObject(message=message, type="invalid_request_error", param=path or None, code=code)
    )


# -- graders (POST /v1/fine_tuning/alpha/graders/run and /validate) ---------------------------------
# The grader object itself is validated by tuneline/server/graders/ (`parse_grader`), which names the
# wrong field as `grader.<path>`; these models only shape the request around it and the responses.


class RunGraderRequest(RequestBody):
    """POST /v1/fine_tuning/alpha/graders/run (contract: RunGraderRequest)."""

    grader: dict[str, Any]
    model_sample: str
    item: dict[str, Any] | None = None


class ValidateGraderRequest(RequestBody):
    """POST /v1/fine_tuning/alpha/graders/validate (contract: ValidateGraderRequest)."""

    grader: dict[str, Any]


class GraderRunErrors(ResponseBody):
    formula_parse_error: bool = False
    sample_parse_error: bool = False
    truncated_observation_error: bool = False
    unresponsive_reward_error: bool = False
    invalid_variable_error: bool = False
    other_error: bool = False
    python_grader_server_error: bool = False
    python_grader_server_error_type: str | None = None
    python_grader_runtime_error: bool = False
    python_grader_runtime_error_details: str | None = None
    model_grader_server_error: bool = False
    model_grader_refusal_error: bool = False
    model_grader_parse_error: bool = False
    model_grader_server_error_details: str | None = None


class GraderRunMetadata(ResponseBody):
    name: str
    type: str
    errors: GraderRunErrors
    execution_time: float
    scores: dict[str, Any]
    token_usage: int | None
    sampled_model_name: str | None


class RunGraderResponse(ResponseBody):
    """Contract: RunGraderResponse."""

    reward: float
    metadata: GraderRunMetadata
    sub_rewards: dict[str, Any]
    model_grader_token_usage_per_model: dict[str, Any]


class ValidateGraderResponse(ResponseBody):
    """Contract: ValidateGraderResponse."""

    grader: dict[str, Any]
