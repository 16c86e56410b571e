"""The template strings of grader inputs, rendered as the hosted API renders them: `{{item.x}}` is the
dataset line's field `x`, `{{sample.output_text}}` the model's answer, `{{sample.output_json.k}}` a
field of the answer parsed as JSON; dots walk into nested objects (and lists, by index). A string is
put in as it is, anything else as its JSON text. A name outside the `item` and `sample` namespaces
is refused when the grader is parsed; a name absent from the line fails the grade
(`invalid_variable_error`).

Written by hand: the hosted syntax is one `{{ path }}` form with no filters or logic, and a template
engine (Jinja) would accept, and run, far more than the API does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from tuneline.server.graders.base import GraderError

VARIABLE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
NAMESPACES = ("item", "sample")
_MISSING = object()


def check(template: str, param: str) -> None:
    """Refuse a template naming something other than `item.*` / `sample.*`."""
    for match in VARIABLE.finditer(template):
        path = match.group(1)
        head = path.split(".", 1)[0]
        if head not in NAMESPACES or not all(part for part in path.split(".")):
            raise GraderError(
                f"Invalid template variable '{{{{{path}}}}}' in '{param}': variables are "
                "'{{item.<field>}}' or '{{sample.output_text}}' / '{{sample.output_json.<field>}}'.",
                param,
            )


def lookup(path: str, sample: Mapping[str, Any], item: Mapping[str, Any]) -> Any:
    head, *rest = path.split(".")
    value: Any = {"item": item, "sample": sample}.get(head, _MISSING)
    for part in rest:
        if isinstance(value, Mapping):
            value = value.get(part, _MISSING)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            value = _MISSING
        if value is _MISSING:
            break
    return value


def text_of(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render(template: str, sample: Mapping[str, Any], item: Mapping[str, Any], param: str) -> str:
    def substitute(match: re.Match[str]) -> str:
        value = lookup(match.group(1), sample, item)
        if value is _MISSING:
            raise GraderError(
                f"Template variable '{{{{{match.group(1)}}}}}' in '{param}' has no value for this item.",
                param,
                kind="invalid_variable_error",
            )
        return text_of(value)

    return VARIABLE.sub(substitute, template)


def sample_of(output_text: str) -> dict[str, Any]:
    """The `sample` namespace of a model answer: its text, and its JSON when the text parses."""
    try:
        output_json = json.loads(output_text)
    except (ValueError, RecursionError):
        output_json = None
    return {"output_text": output_text, "output_json": output_json}
