"""`string_check`: the rendered input compared with the rendered reference. `eq` / `ne`: equal / not
equal; `like`: the input contains the reference; `ilike`: the same, ignoring case. 1.0 or 0.0."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tuneline.server.graders import template
from tuneline.server.graders.base import Grade, refuse_unknown, require_choice, require_string

OPERATIONS = ("eq", "ne", "like", "ilike")


@dataclass
class StringCheckGrader:
    name: str
    input: str
    reference: str
    operation: str
    param: str = "grader"
    type: str = "string_check"

    def grade(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> float:
        text = template.render(self.input, sample, item, f"{self.param}.input")
        reference = template.render(self.reference, sample, item, f"{self.param}.reference")
        if self.operation == "eq":
            return float(text == reference)
        if self.operation == "ne":
            return float(text != reference)
        if self.operation == "like":
            return float(reference in text)
        return float(reference.casefold() in text.casefold())

    def evaluate(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> Grade:
        return Grade(self.grade(sample, item))

    def spec(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "name": self.name,
            "input": self.input,
            "reference": self.reference,
            "operation": self.operation,
        }


def parse(spec: Mapping[str, Any], param: str) -> StringCheckGrader:
    refuse_unknown(spec, param, ("type", "name", "input", "reference", "operation"))
    name = require_string(spec, "name", param)
    text = require_string(spec, "input", param)
    reference = require_string(spec, "reference", param)
    operation = require_choice(spec, "operation", param, OPERATIONS)
    assert name is not None and text is not None and reference is not None
    template.check(text, f"{param}.input")
    template.check(reference, f"{param}.reference")
    return StringCheckGrader(name, text, reference, operation, param)
