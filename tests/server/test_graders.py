"""The grader package (tuneline/server/graders/): parsing with the param of the wrong field, and each
grader type's scores with the hosted semantics."""

from __future__ import annotations

from typing import Any

import pytest

from tuneline.server.graders import GraderError, parse_grader, sample_of


def string_check(operation: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "string_check",
        "name": "check",
        "input": "{{sample.output_text}}",
        "reference": "{{item.label}}",
        "operation": operation,
        **extra,
    }


@pytest.mark.parametrize(
    ("operation", "answer", "label", "reward"),
    [
        ("eq", "Paris", "Paris", 1.0),
        ("eq", "Paris ", "Paris", 0.0),
        ("ne", "Paris", "Lyon", 1.0),
        ("ne", "Paris", "Paris", 0.0),
        ("like", "The capital is Paris.", "Paris", 1.0),
        ("like", "The capital is paris.", "Paris", 0.0),
        ("ilike", "THE CAPITAL IS PARIS.", "paris", 1.0),
        ("ilike", "Lyon", "paris", 0.0),
    ],
)
def test_string_check_operations(operation: str, answer: str, label: str, reward: float) -> None:
    grader = parse_grader(string_check(operation))
    assert grader.grade(sample_of(answer), {"label": label}) == reward


def test_templates_walk_into_json_answers_and_nested_items() -> None:
    grader = parse_grader(
        {
            "type": "string_check",
            "name": "json",
            "input": "{{ sample.output_json.city }}-{{item.meta.codes.1}}",
            "reference": "{{item.expected}}",
            "operation": "eq",
        }
    )
    item = {"expected": "Paris-75", "meta": {"codes": [1, 75]}}
    assert grader.grade(sample_of('{"city": "Paris"}'), item) == 1.0
    assert sample_of("not json")["output_json"] is None
    with pytest.raises(GraderError) as missing:
        grader.grade(sample_of("not json"), item)
    assert missing.value.kind == "invalid_variable_error"
    assert missing.value.param == "grader.input"


@pytest.mark.parametrize(
    ("spec", "param"),
    [
        (string_check("contains"), "grader.operation"),
        ({k: v for k, v in string_check("eq").items() if k != "reference"}, "grader.reference"),
        (string_check("eq", input=3), "grader.input"),
        (string_check("eq", reference="{{items.label}}"), "grader.reference"),
        (string_check("eq", extra=1), "grader.extra"),
        ({"type": "label_model", "name": "x"}, "grader.type"),
        ({"type": "regex", "name": "x"}, "grader.type"),
        ({"name": "x"}, "grader.type"),
    ],
)
def test_invalid_graders_name_the_wrong_field(spec: dict[str, Any], param: str) -> None:
    with pytest.raises(GraderError) as refused:
        parse_grader(spec)
    assert refused.value.param == param
    assert param in refused.value.message
