"""The grader package (tuneline/server/graders/): parsing with the param of the wrong field, and each
grader type's scores with the hosted semantics."""

from __future__ import annotations

import os
import socket
import time
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


def similarity(metric: str) -> dict[str, Any]:
    return {
        "type": "text_similarity",
        "name": "similar",
        "input": "{{sample.output_text}}",
        "reference": "{{item.reference}}",
        "evaluation_metric": metric,
    }


def test_text_similarity_metrics() -> None:
    def score(metric: str, answer: str, reference: str) -> float:
        return parse_grader(similarity(metric)).grade(sample_of(answer), {"reference": reference})

    answer, reference = "the cat sat on the mat", "the cat sat on a mat"
    for metric in ("fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_l"):
        assert score(metric, reference, reference) == pytest.approx(1.0), metric
        assert score(metric, "zzzqqq", reference) == 0.0, metric
        assert 0.0 < score(metric, answer, reference) < 1.0, metric
    # ROUGE-n is the F-measure of shared n-grams: 5 of 6 unigrams, 3 of 5 bigrams.
    assert score("rouge_1", answer, reference) == pytest.approx(5 / 6)
    assert score("rouge_2", answer, reference) == pytest.approx(3 / 5)
    assert score("rouge_5", answer, reference) == 0.0
    assert score("fuzzy_match", "PARIS!", "paris") == 1.0
    assert score("bleu", "paris", "paris") == 1.0  # one word: reweighted to unigrams, not 0


@pytest.mark.parametrize("metric", ["cosine", "meteor"])
def test_text_similarity_metrics_needing_downloads_are_refused(metric: str) -> None:
    with pytest.raises(GraderError) as refused:
        parse_grader(similarity(metric))
    assert refused.value.param == "grader.evaluation_metric"
    assert "not supported on this server" in refused.value.message


def test_formula_grammar() -> None:
    from tuneline.server.graders.formula import FormulaError, parse

    formula = parse(
        "(a + b) * 2 - min(a, b, 0.5) / 4 + abs(-1) + floor(1.7) + ceil(0.2) + exp(0) + log(1)", {"a", "b"}
    )
    assert formula({"a": 1.0, "b": 0.5}) == pytest.approx(3.0 - 0.125 + 1 + 1 + 1 + 1 + 0)
    assert formula.names == {"a", "b"}
    for text in (
        "a ** 2",
        "a.real",
        "a if b else 1",
        "[a][0]",
        "open('x')",
        "c + 1",
        "'a'",
        "True",
        "min(a)",
        "sqrt(a, b)",
        "a +",
    ):
        with pytest.raises(FormulaError):
            parse(text, {"a", "b"})
    with pytest.raises(FormulaError, match="cannot be computed"):
        parse("a / b", {"a", "b"})({"a": 1.0, "b": 0.0})
    with pytest.raises(FormulaError, match="not a finite number"):
        parse("exp(a) * exp(a) * 1e300", {"a"})({"a": 300.0})


def test_multi_grader_shapes_and_errors() -> None:
    exact = {**string_check("eq"), "name": "exact"}
    close = {**string_check("ilike"), "name": "close"}
    by_name = {
        "type": "multi",
        "name": "m",
        "graders": {"e": exact, "c": close},
        "calculate_output": "e + 2 * c",
    }
    grade = parse_grader(by_name).evaluate(sample_of("PARIS"), {"label": "paris"})
    assert grade.reward == 2.0 and grade.report.sub_rewards == {"e": 0.0, "c": 1.0}
    as_list = {**by_name, "graders": [exact, close], "calculate_output": "exact + close"}
    grader = parse_grader(as_list)
    assert grader.grade(sample_of("paris"), {"label": "paris"}) == 2.0
    assert grader.spec() == as_list
    refusals: list[tuple[dict[str, Any], str]] = [
        ({**by_name, "graders": {"e": {**exact, "operation": "is"}}}, "grader.graders.e.operation"),
        ({**by_name, "graders": {"e": by_name}}, "grader.graders.e.type"),
        ({**by_name, "graders": {"bad name": exact}}, "grader.graders.bad name"),
        ({**by_name, "graders": {}}, "grader.graders"),
        ({**by_name, "calculate_output": "e + x"}, "grader.calculate_output"),
        ({**as_list, "graders": [exact, exact]}, "grader.graders[1]"),
    ]
    for spec, param in refusals:
        with pytest.raises(GraderError) as refused:
            parse_grader(spec)
        assert refused.value.param == param, spec


def test_python_grader_limits_from_settings() -> None:
    from tuneline.server.graders import GraderSettings

    settings = GraderSettings(python_timeout_s=1, python_memory_mb=128)
    sleeper = {
        "type": "python",
        "name": "s",
        "source": "import time\ndef grade(sample, item):\n    time.sleep(30)\n",
    }
    started = time.monotonic()
    with pytest.raises(GraderError) as stopped:
        parse_grader(sleeper, settings=settings).grade(sample_of("x"), {})
    assert time.monotonic() - started < 10
    assert stopped.value.kind == "python_grader_runtime_error"
    assert "within 1 s" in stopped.value.message
    secrets = {
        "type": "python",
        "name": "env",
        "source": "import os\ndef grade(sample, item):\n    return float(any('KEY' in k or 'PROXY' in k.upper() for k in os.environ))\n",
    }
    os.environ["TUNELINE_TEST_SECRET_KEY"] = "sk-secret"
    try:
        assert parse_grader(secrets, settings=settings).grade(sample_of("x"), {}) == 0.0
    finally:
        del os.environ["TUNELINE_TEST_SECRET_KEY"]


def test_score_model_parsing_and_an_unreachable_endpoint() -> None:
    from tuneline.server.graders import GraderSettings
    from tuneline.server.graders.score_model import score_of

    assert score_of("0.75") == 0.75
    assert score_of('{"result": 3, "steps": []}') == 3.0
    assert score_of("I would say 7/10.") == 7.0
    assert score_of("no idea") is None
    spec = {
        "type": "score_model",
        "name": "judge",
        "model": "m",
        "input": [{"role": "user", "content": "Score {{sample.output_text}}"}],
        "range": [0, 10],
    }
    with pytest.raises(GraderError) as unconfigured:
        parse_grader(spec)
    assert "none is configured" in unconfigured.value.message
    with pytest.raises(GraderError) as image:
        parse_grader(
            {
                **spec,
                "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x"}]}],
            },
            settings=GraderSettings(score_model_base_url="http://127.0.0.1:1/v1"),
        )
    assert image.value.param == "grader.input[0].content[0].type"
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = GraderSettings(score_model_base_url=f"http://127.0.0.1:{port}/v1", score_model_retries=1)
    started = time.monotonic()
    with pytest.raises(GraderError) as unreachable:
        parse_grader(spec, settings=settings).grade(sample_of("x"), {})
    assert time.monotonic() - started < 20
    assert unreachable.value.kind == "model_grader_server_error"
    assert f"127.0.0.1:{port}" in unreachable.value.message


def test_the_service_bounds_grades_at_once() -> None:
    import threading

    from tuneline.server.errors import APIError
    from tuneline.server.graders import GraderSettings
    from tuneline.server.protocol import RunGraderRequest
    from tuneline.server.services.graders import GraderService

    service = GraderService(GraderSettings(python_timeout_s=5), max_concurrent_runs=1)
    slow = RunGraderRequest(
        grader={
            "type": "python",
            "name": "slow",
            "source": "import time\ndef grade(s, i):\n    time.sleep(1)\n    return 1\n",
        },
        model_sample="x",
    )
    answers: list[float] = []
    worker = threading.Thread(target=lambda: answers.append(service.run(slow).reward))
    worker.start()
    time.sleep(0.3)
    with pytest.raises(APIError) as busy:
        service.run(RunGraderRequest(grader=string_check("eq"), model_sample="a", item={"label": "a"}))
    assert busy.value.status == 429 and busy.value.headers == {"Retry-After": "1"}
    worker.join(timeout=10)
    assert answers == [1.0]
    # The slot is free again.
    assert (
        service.run(RunGraderRequest(grader=string_check("eq"), model_sample="a", item={"label": "a"})).reward
        == 1.0
    )


def test_grade_many_runs_a_batch_in_one_child_with_a_limit_per_grade() -> None:
    from tuneline.server.graders import GraderSettings, grade_many

    source = (
        "import os, time\n"
        "PID = os.getpid()\n"
        "def grade(sample, item):\n"
        "    if item['kind'] == 'hang':\n"
        "        time.sleep(60)\n"
        "    if item['kind'] == 'raise':\n"
        "        raise ValueError('bad item')\n"
        "    return float(PID)\n"
    )
    grader = parse_grader(
        {"type": "python", "name": "b", "source": source}, settings=GraderSettings(python_timeout_s=1)
    )
    kinds = ["ok", "raise", "ok", "hang", "ok"]
    started = time.monotonic()
    outcomes = grade_many(grader, [(sample_of("x"), {"kind": kind}) for kind in kinds])
    assert time.monotonic() - started < 8
    rewards = [o.reward for o in outcomes if not isinstance(o, GraderError)]
    assert len(rewards) == 3 and len(set(rewards)) == 1  # one process graded them all
    assert isinstance(outcomes[1], GraderError) and "ValueError: bad item" in outcomes[1].message
    assert isinstance(outcomes[3], GraderError) and "within 1 s" in outcomes[3].message
    multi = parse_grader(
        {
            "type": "multi",
            "name": "m",
            "graders": {
                "py": {"type": "python", "name": "py", "source": source},
                "exact": string_check("eq"),
            },
            "calculate_output": "exact + py * 0",
        },
        settings=GraderSettings(python_timeout_s=1),
    )
    mixed = grade_many(
        multi,
        [(sample_of("a"), {"kind": "ok", "label": "a"}), (sample_of("a"), {"kind": "raise", "label": "a"})],
    )
    assert not isinstance(mixed[0], GraderError) and mixed[0].reward == 1.0
    assert isinstance(mixed[1], GraderError) and mixed[1].kind == "python_grader_runtime_error"
