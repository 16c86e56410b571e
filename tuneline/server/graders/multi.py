"""`multi`: several graders, each scored, combined by the `calculate_output` formula over their names
(tuneline/server/graders/formula.py). `graders` is an object of name -> grader, as the hosted
reinforcement fine-tuning guide writes it; a list of graders, or one grader (the published schema's
shapes), is also taken, each then named by its `name`, which must then be a formula name. A `multi`
grader holds no `multi` grader."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tuneline.server.graders import formula as formulas
from tuneline.server.graders.base import (
    Grade,
    Grader,
    GradeReport,
    GraderError,
    refuse_unknown,
    require_string,
)

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_GRADERS = 32


@dataclass
class MultiGrader:
    name: str
    graders: dict[str, Grader]
    calculate_output: formulas.Formula
    shape: str  # "object", "list" or "single": how `graders` was given, to show it back the same way
    param: str = "grader"
    type: str = "multi"

    def evaluate(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> Grade:
        report = GradeReport()
        for key, grader in self.graders.items():
            grade = grader.evaluate(sample, item)
            report.sub_rewards[key] = grade.reward
            report.prompt_tokens += grade.report.prompt_tokens
            report.completion_tokens += grade.report.completion_tokens
            report.sampled_model_name = grade.report.sampled_model_name or report.sampled_model_name
        try:
            reward = self.calculate_output(report.sub_rewards)
        except formulas.FormulaError as error:
            raise GraderError(
                str(error), f"{self.param}.calculate_output", kind="formula_parse_error"
            ) from None
        return Grade(reward, report)

    def grade(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> float:
        return self.evaluate(sample, item).reward

    def spec(self) -> dict[str, Any]:
        specs = {key: grader.spec() for key, grader in self.graders.items()}
        graders: Any = specs
        if self.shape == "list":
            graders = list(specs.values())
        elif self.shape == "single":
            graders = next(iter(specs.values()))
        return {
            "type": self.type,
            "name": self.name,
            "graders": graders,
            "calculate_output": self.calculate_output.text,
        }


def parse(
    spec: Mapping[str, Any], param: str, parse_grader: Callable[[Mapping[str, Any], str], Grader]
) -> MultiGrader:
    refuse_unknown(spec, param, ("type", "name", "graders", "calculate_output"))
    name = require_string(spec, "name", param)
    text = require_string(spec, "calculate_output", param)
    assert name is not None and text is not None
    given = spec.get("graders")
    entries: list[tuple[str, str, Any]]  # (formula name, param, spec)
    if given is None:
        raise GraderError(f"Missing required parameter: '{param}.graders'.", f"{param}.graders")
    if isinstance(given, Mapping) and "type" not in given:
        shape = "object"
        entries = [(str(key), f"{param}.graders.{key}", value) for key, value in given.items()]
    elif isinstance(given, list | Mapping):
        shape = "list" if isinstance(given, list) else "single"
        listed = given if isinstance(given, list) else [given]
        entries = []
        for index, value in enumerate(listed):
            where = f"{param}.graders[{index}]" if shape == "list" else f"{param}.graders"
            key = value.get("name") if isinstance(value, Mapping) else None
            entries.append((key if isinstance(key, str) else "", where, value))
    else:
        raise GraderError(
            f"Invalid type for '{param}.graders': expected an object of name -> grader.", f"{param}.graders"
        )
    if not entries:
        raise GraderError(f"'{param}.graders' must hold at least one grader.", f"{param}.graders")
    if len(entries) > MAX_GRADERS:
        raise GraderError(f"'{param}.graders' holds more than {MAX_GRADERS} graders.", f"{param}.graders")
    graders: dict[str, Grader] = {}
    for key, where, value in entries:
        if isinstance(value, Mapping) and value.get("type") == "multi":
            raise GraderError(
                f"Invalid value for '{where}.type': a multi grader cannot hold another multi grader.",
                f"{where}.type",
            )
        grader = parse_grader(value, where)
        if not NAME.match(key):
            raise GraderError(
                f"Invalid grader name {key!r} in '{where}': a name used in calculate_output is letters, "
                "digits and underscores, not starting with a digit.",
                where,
            )
        if key in graders:
            raise GraderError(f"Two graders in '{param}.graders' are named {key!r}.", where)
        graders[key] = grader
    try:
        formula = formulas.parse(text, set(graders))
    except formulas.FormulaError as error:
        raise GraderError(
            f"Invalid value for '{param}.calculate_output': {error}.", f"{param}.calculate_output"
        ) from None
    return MultiGrader(name, graders, formula, shape, param)
