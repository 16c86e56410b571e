"""The training-data line formats of the OpenAI fine-tuning API, and the rules each line must meet.

One source of truth: the validate stage applies these rules to every record, and `tuneline serve`
applies the very same rules to an uploaded training file. Each rule has a stable error key; the
cookbook's keys (`data_type`, `missing_messages_list`, `message_missing_key`,
`message_unrecognized_key`, `unrecognized_role`, `missing_content`,
`example_missing_assistant_message`) keep their meaning, and the rules the cookbook gets wrong or
misses are added: valid tool calls are accepted, `weight` is checked, forbidden special tokens,
content parts, tool definitions and DPO preference lines.

The training method decides which line formats a file may hold (`METHOD_KINDS`): supervised takes
chat (or legacy prompt/completion) lines, dpo takes preference lines, reinforcement takes prompts
(`messages`, `tools`, and any other key, which a grader reads as `{{item.<key>}}`). A line of another
format is `wrong_method_format`. A `messages` line is a chat line or a reinforcement prompt by the
method, never by its keys, so `kind_for_method` needs the method.

Over 600 lines on purpose: every line format's rules, and the file check built on them, stay in the one
module both the validate stage and `tuneline serve` import, so the two can never disagree.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

import orjson

ExampleKind = Literal["chat", "completion", "preference", "reinforcement"]
TrainingMethod = Literal["supervised", "dpo", "reinforcement"]

# The line formats each training method takes (supervised also converts completion lines to chat).
METHOD_KINDS: dict[str, tuple[ExampleKind, ...]] = {
    "supervised": ("chat", "completion"),
    "dpo": ("preference",),
    "reinforcement": ("reinforcement",),
}

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MESSAGE_KEYS = frozenset(
    {"role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call", "refusal"}
)
CHAT_KEYS = frozenset({"messages", "tools", "parallel_tool_calls", "functions"})
COMPLETION_KEYS = frozenset({"prompt", "completion"})
PREFERENCE_KEYS = frozenset({"input", "preferred_output", "non_preferred_output"})
# Reserved keys of a reinforcement line; every other key is data for the grader.
REINFORCEMENT_KEYS = frozenset({"messages", "tools"})
REINFORCEMENT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
CONTENT_PART_TYPES = frozenset({"text", "image_url", "input_audio", "file"})

# Special tokens inside text fail a hosted job after upload ("contains an invalid token").
SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>")

# Every error key a record can be quarantined with for its format, with what it means.
RULES: dict[str, str] = {
    "data_type": "each line must be a JSON object",
    "missing_messages_list": "a chat example needs a non-empty `messages` list",
    "wrong_method_format": "the line's format does not fit training.method (supervised: chat or "
    "prompt/completion lines; dpo: preference lines; reinforcement: messages ending in a user turn)",
    "message_missing_key": "each message needs `role` and `content` (or `tool_calls` on assistant turns)",
    "message_unrecognized_key": "a message has a key the API does not accept",
    "unrecognized_role": "roles are system, developer, user, assistant, tool",
    "missing_content": "a message has empty or missing content",
    "example_missing_assistant_message": "an example needs an assistant turn to learn from (weight not 0)",
    "example_unrecognized_key": "the example has a top-level key the API does not accept",
    "invalid_weight": "`weight` is only allowed on assistant messages and must be 0 or 1",
    "invalid_content_part": "content parts must be objects with a known `type` and its payload",
    "invalid_tool_call": "tool calls need id, type `function`, a function name and JSON arguments",
    "invalid_tools": "`tools` must be a list of function definitions with a name",
    "forbidden_special_token": "text contains a special token such as <|endoftext|>",
    "invalid_completion_example": "a legacy example needs non-empty string `prompt` and `completion`",
    "invalid_preference_example": "a DPO line needs input.messages and one assistant message in each output",
    "invalid_reinforcement_example": "a reinforcement line needs `messages` ending in a user turn, and grader "
    "fields that are JSON values",
}


@dataclass(frozen=True, slots=True)
class FormatIssue:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.message} ({self.key})"


def detect_kind(example: Any) -> ExampleKind | None:
    """The line format an example claims by its keys; None when it claims none."""
    if not isinstance(example, dict):
        return None
    if "messages" in example:
        return "chat"
    if "input" in example or "preferred_output" in example:
        return "preference"
    if "prompt" in example or "completion" in example:
        return "completion"
    return None


def kind_for_method(example: Any, method: TrainingMethod | str) -> ExampleKind | None:
    """The line format of an example in a file of this method: a `messages` line is a reinforcement
    prompt under method reinforcement, a chat example otherwise."""
    kind = detect_kind(example)
    if kind == "chat" and method == "reinforcement":
        return "reinforcement"
    return kind


def check_for_method(
    example: Any, method: TrainingMethod | str, allowed: Iterable[ExampleKind] | None = None
) -> FormatIssue | None:
    """The first rule this example breaks as a line of a `method` training file (`allowed`: narrower
    formats, e.g. completion lines only for a completion model), or None when it is valid."""
    if not isinstance(example, dict):
        return FormatIssue("data_type", f"expected a JSON object, got {type(example).__name__}")
    kind = kind_for_method(example, method)
    if kind is None:
        return check_example(example)
    wanted = METHOD_KINDS[method]
    if kind not in wanted:
        named = {"chat": "chat", "completion": "prompt/completion", "preference": "preference"}
        return FormatIssue(
            "wrong_method_format",
            f"a {named.get(kind, kind)} line in a {method} training file, which takes "
            f"{' or '.join(named.get(k, 'reinforcement (messages + grader fields)') for k in wanted)} lines",
        )
    if kind == "reinforcement":
        return check_reinforcement(example)
    return check_example(example, allowed if allowed is not None else wanted)


def check_example(example: Any, allowed: Iterable[ExampleKind] | None = None) -> FormatIssue | None:
    """The first rule this example breaks, or None when it is a valid training line (of a file whose
    method the line's keys tell: supervised or dpo; see `check_for_method`)."""
    if not isinstance(example, dict):
        return FormatIssue("data_type", f"expected a JSON object, got {type(example).__name__}")
    kind = detect_kind(example)
    if kind is None:
        return FormatIssue("missing_messages_list", "no `messages` list in the example")
    if allowed is not None and kind not in set(allowed):
        accepted = sorted(set(allowed))
        # A completion model (babbage-002, davinci-002) is told about prompt/completion, not `messages`.
        key = "invalid_completion_example" if accepted == ["completion"] else "missing_messages_list"
        return FormatIssue(key, f"a {kind} line where only {' or '.join(accepted)} lines are accepted")
    if kind == "chat":
        return check_chat(example)
    if kind == "completion":
        return check_completion(example)
    return check_preference(example)


def check_chat(example: dict[str, Any]) -> FormatIssue | None:
    extra = example.keys() - CHAT_KEYS
    if extra:
        return FormatIssue("example_unrecognized_key", f"unrecognized key {sorted(extra)[0]!r}")
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        return FormatIssue("missing_messages_list", "`messages` must be a non-empty list")
    tool_names: set[str] | None = None
    if "tools" in example:
        tool_names, issue = _check_tools(example["tools"])
        if issue:
            return issue
    if "parallel_tool_calls" in example and not isinstance(example["parallel_tool_calls"], bool):
        return FormatIssue("example_unrecognized_key", "`parallel_tool_calls` must be true or false")
    call_ids: set[str] = set()
    learnable = False
    for index, message in enumerate(messages):
        issue = _check_message(index, message, tool_names, call_ids)
        if issue:
            return issue
        if message["role"] == "assistant" and message.get("weight", 1) == 1:
            learnable = True
    if not learnable:
        return FormatIssue(
            "example_missing_assistant_message", "no assistant message to learn from (weight not 0)"
        )
    return None


def _check_message(
    index: int, message: Any, tool_names: set[str] | None, call_ids: set[str]
) -> FormatIssue | None:
    where = f"message {index}"
    if not isinstance(message, dict):
        return FormatIssue("message_missing_key", f"{where} is not an object")
    extra = message.keys() - MESSAGE_KEYS
    if extra:
        return FormatIssue("message_unrecognized_key", f"{where} has unrecognized key {sorted(extra)[0]!r}")
    role = message.get("role")
    if role is None:
        return FormatIssue("message_missing_key", f"{where} has no `role`")
    if role not in CHAT_ROLES:
        return FormatIssue("unrecognized_role", f"{where} has unrecognized role {role!r}")
    if "weight" in message:
        weight = message["weight"]
        if role != "assistant":
            return FormatIssue("invalid_weight", f"{where}: `weight` is only allowed on assistant messages")
        if isinstance(weight, bool) or weight not in (0, 1):
            return FormatIssue("invalid_weight", f"{where}: `weight` must be 0 or 1, got {weight!r}")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            return FormatIssue("invalid_tool_call", f"{where}: only assistant messages carry `tool_calls`")
        issue = _check_tool_calls(where, tool_calls, tool_names, call_ids)
        if issue:
            return issue
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or call_id not in call_ids:
            return FormatIssue(
                "invalid_tool_call",
                f"{where}: tool message must answer an earlier tool call by `tool_call_id`",
            )
    if "content" not in message and not (role == "assistant" and (tool_calls or "function_call" in message)):
        return FormatIssue("message_missing_key", f"{where} ({role}) has no `content`")
    content = message.get("content")
    if content is None:
        if role == "assistant" and (tool_calls or "function_call" in message):
            return None
        return FormatIssue("missing_content", f"{where} ({role}) has empty content")
    if isinstance(content, str):
        if not content.strip():
            return FormatIssue("missing_content", f"{where} ({role}) has empty content")
        return _check_text(where, content)
    if isinstance(content, list):
        return _check_content_parts(where, role, content)
    return FormatIssue("missing_content", f"{where} ({role}) content must be a string or a list of parts")


def _check_text(where: str, text: str) -> FormatIssue | None:
    if "<|" in text:  # cheap pre-filter: the regex runs only on the rare candidate
        found = SPECIAL_TOKEN.search(text)
        if found:
            return FormatIssue(
                "forbidden_special_token", f"{where} contains the special token {found.group()}"
            )
    return None


def _check_content_parts(where: str, role: str, parts: list[Any]) -> FormatIssue | None:
    if not parts:
        return FormatIssue("missing_content", f"{where} ({role}) has an empty list of content parts")
    has_payload = False
    for part in parts:
        if not isinstance(part, dict) or part.get("type") not in CONTENT_PART_TYPES:
            return FormatIssue("invalid_content_part", f"{where} has a content part without a known `type`")
        kind = part["type"]
        payload = part.get(kind)
        if kind == "text":
            if not isinstance(payload, str):
                return FormatIssue("invalid_content_part", f"{where} has a text part without `text`")
            issue = _check_text(where, payload)
            if issue:
                return issue
            has_payload = has_payload or bool(payload.strip())
        elif not isinstance(payload, dict):
            return FormatIssue("invalid_content_part", f"{where} has a {kind} part without its payload")
        else:
            has_payload = True
    if not has_payload:
        return FormatIssue("missing_content", f"{where} ({role}) has only empty content parts")
    return None


def _check_tool_calls(
    where: str, tool_calls: Any, tool_names: set[str] | None, call_ids: set[str]
) -> FormatIssue | None:
    if not isinstance(tool_calls, list) or not tool_calls:
        return FormatIssue("invalid_tool_call", f"{where}: `tool_calls` must be a non-empty list")
    for call in tool_calls:
        if (
            not isinstance(call, dict)
            or not isinstance(call.get("id"), str)
            or call.get("type") != "function"
        ):
            return FormatIssue(
                "invalid_tool_call", f"{where}: each tool call needs a string `id` and type function"
            )
        function = call.get("function")
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not function["name"]
        ):
            return FormatIssue("invalid_tool_call", f"{where}: tool call {call['id']!r} has no function name")
        if tool_names is not None and function["name"] not in tool_names:
            return FormatIssue(
                "invalid_tool_call",
                f"{where}: tool call names {function['name']!r}, which `tools` does not define",
            )
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            return FormatIssue("invalid_tool_call", f"{where}: tool call arguments must be a JSON string")
        try:
            json.loads(arguments)
        except ValueError:
            return FormatIssue("invalid_tool_call", f"{where}: tool call arguments are not valid JSON")
        call_ids.add(call["id"])
    return None


def _check_tools(tools: Any) -> tuple[set[str], FormatIssue | None]:
    names: set[str] = set()
    if not isinstance(tools, list) or not tools:
        return names, FormatIssue("invalid_tools", "`tools` must be a non-empty list")
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            return names, FormatIssue(
                "invalid_tools", "each tool needs type function and a `function` object"
            )
        name = function.get("name")
        if not isinstance(name, str) or not name:
            return names, FormatIssue("invalid_tools", "each tool function needs a `name`")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            return names, FormatIssue(
                "invalid_tools", f"tool {name!r}: `parameters` must be a JSON schema object"
            )
        names.add(name)
    return names, None


def check_completion(example: dict[str, Any]) -> FormatIssue | None:
    extra = example.keys() - COMPLETION_KEYS
    if extra:
        return FormatIssue("example_unrecognized_key", f"unrecognized key {sorted(extra)[0]!r}")
    for key in ("prompt", "completion"):
        value = example.get(key)
        if not isinstance(value, str) or not value.strip():
            return FormatIssue("invalid_completion_example", f"`{key}` must be a non-empty string")
        issue = _check_text(key, value)
        if issue:
            return issue
    return None


def check_preference(example: dict[str, Any]) -> FormatIssue | None:
    extra = example.keys() - PREFERENCE_KEYS
    if extra:
        return FormatIssue("example_unrecognized_key", f"unrecognized key {sorted(extra)[0]!r}")
    source = example.get("input")
    if not isinstance(source, dict) or not isinstance(source.get("messages"), list) or not source["messages"]:
        return FormatIssue("invalid_preference_example", "`input.messages` must be a non-empty list")
    call_ids: set[str] = set()
    for index, message in enumerate(source["messages"]):
        issue = _check_message(index, message, None, call_ids)
        if issue:
            return issue
    if sum(1 for m in source["messages"] if m["role"] == "user") != 1:
        return FormatIssue(
            "invalid_preference_example", "DPO examples are single-turn: exactly one user message"
        )
    if source["messages"][-1]["role"] != "user":
        return FormatIssue("invalid_preference_example", "`input.messages` must end with the user message")
    for key in ("preferred_output", "non_preferred_output"):
        output = example.get(key)
        if not isinstance(output, list) or len(output) != 1:
            return FormatIssue("invalid_preference_example", f"`{key}` must hold exactly one message")
        message = output[0]
        if not isinstance(message, dict) or message.get("role") != "assistant":
            return FormatIssue("invalid_preference_example", f"`{key}` must be an assistant message")
        issue = _check_message(0, message, None, call_ids)
        if issue:
            return issue
    return None


def check_reinforcement(example: dict[str, Any]) -> FormatIssue | None:
    """A reinforcement prompt (FineTuneReinforcementRequestInput): `messages` (system, developer, user,
    assistant, tool) ending in the user turn the model answers, optional `tools`, and any other key as
    data for the grader."""
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        return FormatIssue("invalid_reinforcement_example", "`messages` must be a non-empty list")
    tool_names: set[str] | None = None
    if "tools" in example:
        tool_names, issue = _check_tools(example["tools"])
        if issue:
            return issue
    call_ids: set[str] = set()
    for index, message in enumerate(messages):
        issue = _check_message(index, message, tool_names, call_ids)
        if issue:
            return issue
        if message["role"] not in REINFORCEMENT_ROLES:
            return FormatIssue(
                "invalid_reinforcement_example", f"message {index}: role {message['role']!r} is not accepted"
            )
    if messages[-1]["role"] != "user":
        return FormatIssue(
            "invalid_reinforcement_example",
            "the last message must be the user turn the model answers (the grader scores the answer)",
        )
    for key in example.keys() - REINFORCEMENT_KEYS:
        if not isinstance(key, str) or not key.isidentifier():
            return FormatIssue(
                "invalid_reinforcement_example",
                f"grader field {key!r} is not a name a template can reference as {{{{item.<name>}}}}",
            )
        for text in _strings(example[key]):
            issue = _check_text(key, text)
            if issue:
                return issue
    return None


def _strings(value: Any) -> Iterator[str]:
    """Every string inside a JSON value (keys of objects too), depth first."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for key, inner in node.items():
                yield str(key)
                stack.append(inner)
        elif isinstance(node, list):
            stack.extend(node)


def grader_fields(example: dict[str, Any]) -> dict[str, Any]:
    """The keys of a reinforcement line a grader reads as {{item.<key>}} (all but messages and tools)."""
    return {k: v for k, v in example.items() if k not in REINFORCEMENT_KEYS}


def completion_to_chat(example: dict[str, Any], system_prompt: str | None) -> dict[str, Any]:
    """A legacy prompt/completion line as a chat example for chat models."""
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": example["prompt"].strip()})
    messages.append({"role": "assistant", "content": example["completion"].strip()})
    return {"messages": messages}


def message_text(message: dict[str, Any]) -> str:
    """The plain text of a message's content (content parts joined, tool calls left out)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def example_texts(example: dict[str, Any]) -> Iterator[str]:
    """Every free-text string of an example (for secret scans and normalised forms)."""
    if "messages" in example:
        for message in example["messages"]:
            yield message_text(message)
            for call in message.get("tool_calls") or ():
                yield call["function"].get("arguments", "")
        for key in sorted(example.keys() - CHAT_KEYS):  # a reinforcement line's grader fields
            yield from _strings(example[key])
    elif "input" in example:
        for message in example["input"]["messages"]:
            yield message_text(message)
        for key in ("preferred_output", "non_preferred_output"):
            for message in example[key]:
                yield message_text(message)
    else:
        yield example.get("prompt", "")
        yield example.get("completion", "")


def example_text_places(example: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """`example_texts` with where each text is in the example (`messages[1].content`, `prompt`, ...),
    for messages that point at a text without quoting it."""
    if "messages" in example:
        for index, message in enumerate(example["messages"]):
            yield f"messages[{index}].content", message_text(message)
            for number, call in enumerate(message.get("tool_calls") or ()):
                yield (
                    f"messages[{index}].tool_calls[{number}].function.arguments",
                    call["function"].get("arguments", ""),
                )
        for key in sorted(example.keys() - CHAT_KEYS):
            for text in _strings(example[key]):
                yield key, text
    elif "input" in example:
        for index, message in enumerate(example["input"]["messages"]):
            yield f"input.messages[{index}].content", message_text(message)
        for key in ("preferred_output", "non_preferred_output"):
            for index, message in enumerate(example[key]):
                yield f"{key}[{index}].content", message_text(message)
    else:
        yield "prompt", example.get("prompt", "")
        yield "completion", example.get("completion", "")


def prompt_and_answer(example: dict[str, Any]) -> tuple[str, str]:
    """What the example asks (every turn before the last assistant turn) and what it answers."""
    if "messages" in example:
        messages = example["messages"]
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
        prompt = "\n".join(message_text(m) for m in messages[:last] if m.get("role") != "system")
        answer = message_text(messages[last]) if last < len(messages) else ""
        if last < len(messages) and messages[last].get("tool_calls"):
            answer += json.dumps(messages[last]["tool_calls"], sort_keys=True)
        return prompt, answer
    if "input" in example:
        prompt = "\n".join(message_text(m) for m in example["input"]["messages"] if m.get("role") != "system")
        return prompt, message_text(example["preferred_output"][0])
    return example.get("prompt", ""), example.get("completion", "")


@dataclass(frozen=True, slots=True)
class FileIssue:
    """Why a whole training file is refused, naming the line (1-based) when one line is at fault."""

    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.message} ({self.key})"


# A UTF-8 byte order mark, which Windows editors write at the start of a file.
BOM = b"\xef\xbb\xbf"
# How deep a training line's JSON may nest (a chat line needs about 6 levels; tool schemas a few more).
MAX_JSON_DEPTH = 64
# How long a training line may be, in bytes, unless the caller says otherwise.
MAX_EXAMPLE_BYTES = 1 << 20


def jsonl_line(raw: bytes, number: int) -> bytes:
    """The bytes to parse of line `number` (1-based) of a JSONL file: without its line ending, and
    without a UTF-8 byte order mark when it is the first line (one rule for prepare and the server)."""
    line = raw.removesuffix(b"\n").removesuffix(b"\r")
    return line.removeprefix(BOM) if number == 1 else line


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether parsed JSON nests deeper than `limit` arrays and objects (walked without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Iterable[Any] = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def bounded_lines(handle: BinaryIO, max_bytes: int) -> Iterator[bytes]:
    """The lines of a binary file, each cut after `max_bytes` + 1 bytes: the rest of a longer line is
    read and dropped, never held, so a check can refuse it without paying its size in memory."""
    while line := handle.readline(max_bytes + 1):
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while (rest := handle.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
        yield line


def check_training_file(
    lines: Iterable[bytes],
    min_examples: int = 10,
    max_line_bytes: int = MAX_EXAMPLE_BYTES,
    method: TrainingMethod | None = None,
) -> tuple[int, FileIssue | None]:
    """Check an uploaded JSONL training file line by line, as the hosted service does after upload.

    Returns the number of examples and the first problem (None when the file is valid); it never
    raises for any content. All lines must share one format; blank lines are skipped; a UTF-8 byte
    order mark before the first line is accepted (`jsonl_line`). A line is refused when it is longer
    than `max_line_bytes` or its JSON nests deeper than MAX_JSON_DEPTH levels. With `method`, each line
    is checked as a line of that method's file (`check_for_method`: `wrong_method_format` for a line
    of another method); without it, by its keys alone.
    """
    count = 0
    first_kind: ExampleKind | None = None
    for number, raw in enumerate(lines, start=1):
        line = jsonl_line(raw, number)
        if not line.strip():
            continue
        if len(line) > max_line_bytes:
            return count, FileIssue(
                number,
                "too_large",
                f"the line is longer than {max_line_bytes} bytes, the most one example may take",
            )
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return count, FileIssue(number, "invalid_encoding", "the line is not valid UTF-8")
        try:
            example = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            if "depth" in exc.msg:
                return count, _too_deep(number)
            return count, FileIssue(number, "invalid_json", "the line is not valid JSON")
        if json_depth_exceeds(example, MAX_JSON_DEPTH):
            return count, _too_deep(number)
        issue = check_example(example) if method is None else check_for_method(example, method)
        if issue:
            return count, FileIssue(number, issue.key, issue.message)
        kind = detect_kind(example) if method is None else kind_for_method(example, method)
        if first_kind is None:
            first_kind = kind
        elif kind != first_kind:
            return count, FileIssue(number, "mixed_formats", f"a {kind} line in a file of {first_kind} lines")
        count += 1
    if count < min_examples:
        return count, FileIssue(
            None,
            "too_few_examples",
            f"Training file has {count} example(s), but must have at least {min_examples} examples",
        )
    return count, None


def _too_deep(number: int) -> FileIssue:
    return FileIssue(number, "too_deep", f"the line's JSON nests deeper than {MAX_JSON_DEPTH} levels")
