"""POST /v1/fine_tuning/alpha/graders/run and /validate on a real `tuneline serve`, through the unmodified
`openai` SDK: every grader type, bodies checked against the contract, invalid graders refused with the
param of the wrong field, failing graders reported in `metadata.errors` without holding the server, and
a score_model grader answered by a model this very server serves (tuneline-tiny)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

PYTHON_TIMEOUT_S = 2
API_KEY = "sk-tuneline-graders-test"
Validate = Callable[[str, Any], None]


@pytest.fixture(scope="module")
def server(server_state: Path) -> Iterator[Any]:
    """The module's server, with a short python-grader time limit so the hanging grader is quick to stop."""
    from tuneline.server.launcher import start_server

    env = {
        "TUNELINE_PYTHON_GRADER_TIMEOUT_S": str(PYTHON_TIMEOUT_S),
        "TUNELINE_PYTHON_GRADER_MEMORY_MB": "256",
    }
    with start_server(server_state, api_key=API_KEY, env=env) as process:
        yield process


def run(
    client: Any, validate: Validate, grader: dict[str, Any], sample: str, item: Any = None
) -> dict[str, Any]:
    result = client.fine_tuning.alpha.graders.run(grader=grader, model_sample=sample, item=item or {})
    body = result.model_dump(by_alias=True)
    validate("RunGraderResponse", body)
    return body


def failed_flags(body: dict[str, Any]) -> set[str]:
    return {key for key, value in body["metadata"]["errors"].items() if value is True}


STRING_CHECK = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.label}}",
    "operation": "eq",
}


def python_grader(body: str, name: str = "py") -> dict[str, Any]:
    return {"type": "python", "name": name, "source": body}


def test_validate_shows_the_grader_back(client: Any, validate: Validate) -> None:
    body = client.fine_tuning.alpha.graders.validate(grader=STRING_CHECK).model_dump()
    validate("ValidateGraderResponse", body)
    assert body["grader"] == STRING_CHECK
    # `graders` as an object of name -> grader, as the hosted service takes it (the published schema
    # shows one grader): the raw body, which the SDK's one-grader model cannot hold.
    multi = {
        "type": "multi",
        "name": "both",
        "graders": {"exact": STRING_CHECK, "close": {**STRING_CHECK, "name": "close", "operation": "ilike"}},
        "calculate_output": "0.5 * exact + 0.5 * close",
    }
    raw = client.post("/fine_tuning/alpha/graders/validate", body={"grader": multi}, cast_to=object)
    assert raw == {"grader": multi}
    for grader in raw["grader"]["graders"].values():
        validate("GraderStringCheck", grader)


@pytest.mark.parametrize(
    ("grader", "param", "words"),
    [
        ({**STRING_CHECK, "operation": "contains"}, "grader.operation", "eq, ne, like, ilike"),
        (
            {**STRING_CHECK, "type": "text_similarity", "evaluation_metric": "cosine", "operation": None},
            "grader.operation",
            "Unknown parameter",
        ),
        (
            {k: v for k, v in STRING_CHECK.items() if k != "operation"}
            | {"type": "text_similarity", "evaluation_metric": "cosine"},
            "grader.evaluation_metric",
            "embeddings model",
        ),
        (python_grader("def score(sample, item):\n    return 1\n"), "grader.source", "def grade"),
        (python_grader("def grade(sample, item)\n    return 1\n"), "grader.source", "line 1"),
        (
            {
                "type": "multi",
                "name": "m",
                "graders": {"a": STRING_CHECK},
                "calculate_output": "a + __import__('os').getpid()",
            },
            "grader.calculate_output",
            "only the functions",
        ),
        (
            {
                "type": "multi",
                "name": "m",
                "graders": {"a": {**STRING_CHECK, "input": 7}},
                "calculate_output": "a",
            },
            "grader.graders.a.input",
            "expected a string",
        ),
        ({"type": "label_model", "name": "x"}, "grader.type", "label_model"),
    ],
)
def test_invalid_graders_are_400_naming_the_field(
    client: Any, grader: dict[str, Any], param: str, words: str
) -> None:
    for call in (
        lambda: client.fine_tuning.alpha.graders.validate(grader=grader),
        lambda: client.fine_tuning.alpha.graders.run(grader=grader, model_sample="x"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            call()
        error: Any = refused.value.body
        assert error["param"] == param
        assert error["type"] == "invalid_request_error"
        assert words in error["message"]


def test_a_request_without_model_sample_is_refused(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.post("/fine_tuning/alpha/graders/run", body={"grader": STRING_CHECK}, cast_to=object)
    error: Any = refused.value.body
    assert error["param"] == "model_sample"
    assert error["code"] == "missing_required_parameter"


def test_string_check_and_text_similarity(client: Any, validate: Validate) -> None:
    assert run(client, validate, STRING_CHECK, "Paris", {"label": "Paris"})["reward"] == 1.0
    wrong = run(client, validate, STRING_CHECK, "Lyon", {"label": "Paris"})
    assert wrong["reward"] == 0.0 and not failed_flags(wrong)
    assert wrong["metadata"]["name"] == "exact" and wrong["metadata"]["type"] == "string_check"
    similarity = {**STRING_CHECK, "type": "text_similarity", "evaluation_metric": "rouge_1"}
    del similarity["operation"]
    close = run(client, validate, similarity, "the cat sat on the mat", {"label": "the cat sat on a mat"})
    assert close["reward"] == pytest.approx(5 / 6)
    fuzzy = run(
        client, validate, {**similarity, "evaluation_metric": "fuzzy_match"}, "Pariss", {"label": "Paris"}
    )
    assert 0.8 < fuzzy["reward"] < 1.0
    missing = run(client, validate, STRING_CHECK, "Paris", {"answer": "Paris"})
    assert missing["reward"] == 0.0 and failed_flags(missing) == {"invalid_variable_error"}


def test_python_graders_run_and_fail_clearly(client: Any, validate: Validate) -> None:
    grader = python_grader(
        "import json\n"
        "def grade(sample, item):\n"
        "    answer = sample['output_json'] or {}\n"
        "    return 1.0 if answer.get('total') == sum(item['numbers']) else 0.25\n"
    )
    assert run(client, validate, grader, '{"total": 6}', {"numbers": [1, 2, 3]})["reward"] == 1.0
    assert run(client, validate, grader, '{"total": 7}', {"numbers": [1, 2, 3]})["reward"] == 0.25
    raising = run(
        client, validate, python_grader("def grade(sample, item):\n    raise KeyError('nope')\n"), "x"
    )
    assert raising["reward"] == 0.0 and failed_flags(raising) == {"python_grader_runtime_error"}
    assert "KeyError: 'nope'" in raising["metadata"]["errors"]["python_grader_runtime_error_details"]
    hungry = run(
        client, validate, python_grader("def grade(sample, item):\n    return len(bytearray(1 << 30))\n"), "x"
    )
    assert (
        "out of memory (limit 256 MB)" in hungry["metadata"]["errors"]["python_grader_runtime_error_details"]
    )


def test_a_hanging_python_grader_is_stopped_and_the_server_keeps_answering(
    client: Any, validate: Validate
) -> None:
    hanging = python_grader("def grade(sample, item):\n    while True:\n        pass\n")
    answers: list[dict[str, Any]] = []
    started = time.monotonic()
    worker = threading.Thread(target=lambda: answers.append(run(client, validate, hanging, "x")))
    worker.start()
    time.sleep(0.3)
    # Meanwhile other requests are answered at once.
    assert run(client, validate, STRING_CHECK, "a", {"label": "a"})["reward"] == 1.0
    assert worker.is_alive()
    worker.join(timeout=30)
    elapsed = time.monotonic() - started
    assert answers, "the hanging grader's request never came back"
    assert PYTHON_TIMEOUT_S <= elapsed < PYTHON_TIMEOUT_S + 10
    details = answers[0]["metadata"]["errors"]["python_grader_runtime_error_details"]
    assert f"did not finish within {PYTHON_TIMEOUT_S} s" in details


def test_python_graders_have_no_network(client: Any, validate: Validate, server: Any) -> None:
    from urllib.parse import urlparse

    from tuneline.server.graders.python_grader import network_isolation

    port = urlparse(server.base_url).port
    through_socket = python_grader(
        "import socket\n"
        "def grade(sample, item):\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "    return 1.0\n"
    )
    body = run(client, validate, through_socket, "x")
    assert "network access is disabled" in body["metadata"]["errors"]["python_grader_runtime_error_details"]
    if network_isolation() != "namespace":
        pytest.skip("this kernel refuses network namespaces: only the socket guard applies")
    # Past the Python guard (libc directly): the empty network namespace still has no route.
    through_libc = python_grader(
        "import ctypes, struct\n"
        "def grade(sample, item):\n"
        "    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    fd = libc.socket(2, 1, 0)\n"
        f"    address = struct.pack('!HH4s8x', 2, {port}, bytes([127, 0, 0, 1]))\n"
        "    return 1.0 if libc.connect(fd, address, len(address)) == 0 else 0.0\n"
    )
    assert run(client, validate, through_libc, "x")["reward"] == 0.0


def test_multi_combines_its_graders_by_formula(client: Any, validate: Validate) -> None:
    grader = {
        "type": "multi",
        "name": "combined",
        "graders": {
            "exact": STRING_CHECK,
            "length": python_grader("def grade(sample, item):\n    return len(sample['output_text']) / 10\n"),
        },
        "calculate_output": "0.5 * exact + max(length, 0.1) - sqrt(0.04)",
    }
    body = run(client, validate, grader, "Paris", {"label": "Paris"})
    assert body["sub_rewards"] == {"exact": 1.0, "length": 0.5}
    assert body["reward"] == pytest.approx(0.5 + 0.5 - 0.2)
    zero = {**grader, "calculate_output": "exact / (length - 0.5)"}
    failed = run(client, validate, zero, "Paris", {"label": "Paris"})
    assert failed["reward"] == 0.0 and failed_flags(failed) == {"formula_parse_error"}


def score_model(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "score_model",
        "name": "judge",
        "model": model,
        "input": [
            {"role": "system", "content": "Answer with one number between 0 and 1."},
            {
                "role": "user",
                "content": [
                    {
                        "type": "input_text",
                        "text": "Reference: {{item.label}}\nAnswer: {{sample.output_text}}",
                    }
                ],
            },
        ],
        "sampling_params": {"temperature": 0, "seed": 1, "max_completions_tokens": 12},
        **extra,
    }


def test_score_model_is_answered_by_a_model_this_server_serves(client: Any, validate: Validate) -> None:
    body = run(client, validate, score_model("tuneline-tiny", range=[0, 1]), "Paris", {"label": "Paris"})
    metadata = body["metadata"]
    assert metadata["sampled_model_name"] == "tuneline-tiny"
    assert metadata["token_usage"] > 0
    usage = body["model_grader_token_usage_per_model"]["tuneline-tiny"]
    assert (
        usage["total_tokens"]
        == metadata["token_usage"]
        == usage["prompt_tokens"] + usage["completion_tokens"]
    )
    flags = failed_flags(body)
    # The built-in model is tiny and untrained: it either answers a number (clamped into the range) or
    # words (a parse error); never a server error.
    assert flags <= {"model_grader_parse_error"}
    assert 0.0 <= body["reward"] <= 1.0
    if flags:
        assert "holds no number" in metadata["errors"]["model_grader_server_error_details"]


def test_score_model_with_an_unknown_model_reports_the_server_error(client: Any, validate: Validate) -> None:
    body = run(client, validate, score_model("no-such-model"), "Paris", {"label": "Paris"})
    assert body["reward"] == 0.0 and failed_flags(body) == {"model_grader_server_error"}
    assert "HTTP 404" in body["metadata"]["errors"]["model_grader_server_error_details"]
