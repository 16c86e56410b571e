"""Fixtures for the server's tests: the OpenAPI contract (tests/server/openapi/) as validators, tiny training files, and a
real `tuneline serve` process per test module (started by tuneline/server/launcher.py)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The contract: a pruned copy of openai/openai-openapi kept in the project (tests/server/openapi/README.md).
SPEC_PATH = Path(__file__).resolve().parent / "openapi" / "openai-openapi.yaml"
API_KEY = "sk-tuneline-test-key"

Validate = Callable[[str, Any], None]


def _openapi30_to_json_schema(node: Any) -> Any:
    """The OpenAPI 3.0 forms still used in parts of the spec, as JSON Schema 2020-12: `nullable: true`
    becomes a `null` type, and a boolean `exclusiveMinimum` becomes the number it qualifies."""
    if isinstance(node, list):
        return [_openapi30_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _openapi30_to_json_schema(value) for key, value in node.items()}
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), bool) and node.pop(bound) and limit in node:
            node[bound] = node.pop(limit)
    if node.pop("nullable", False):
        if "type" in node:
            types = node["type"] if isinstance(node["type"], list) else [node["type"]]
            node["type"] = [*types, "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    return node


# Where the hosted service itself departs from the published schema, the contract follows the service
# (shared/spec/fine-tuning-api.md): `/pause` answers status "paused", which the enum omits, and an
# empty file list has no first or last id.
def _hosted_deviations(schemas: dict[str, Any]) -> None:
    status = schemas["FineTuningJob"]["properties"]["status"]
    status["enum"] = [*status["enum"], "paused"]
    for key in ("first_id", "last_id"):
        schemas["ListFilesResponse"]["properties"][key] = {"type": ["string", "null"]}


@pytest.fixture(scope="session")
def openapi_components() -> dict[str, Any]:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    spec = yaml.load(SPEC_PATH.read_text(encoding="utf-8"), Loader=loader)
    components = _openapi30_to_json_schema(spec["components"])
    _hosted_deviations(components["schemas"])
    return components


@pytest.fixture(scope="session")
def validate(openapi_components: dict[str, Any]) -> Validate:
    """validate("FineTuningJob", body) raises jsonschema.ValidationError when body breaks the contract."""
    from jsonschema import Draft202012Validator

    validators: dict[str, Draft202012Validator] = {}

    def check(schema_name: str, body: Any) -> None:
        if schema_name not in openapi_components["schemas"]:
            raise KeyError(f"no component schema {schema_name} in {SPEC_PATH}")
        if schema_name not in validators:
            root = {"$ref": f"#/components/schemas/{schema_name}", "components": openapi_components}
            validators[schema_name] = Draft202012Validator(root)
        validators[schema_name].validate(body)

    return check


def chat_example(index: int) -> dict[str, Any]:
    """A short support exchange whose answer depends on the question (so a model can learn it)."""
    topics = ["refund", "password", "shipping", "invoice", "login"]
    topic = topics[index % len(topics)]
    return {
        "messages": [
            {"role": "system", "content": "You are the support assistant."},
            {"role": "user", "content": f"Question {index}: help with my {topic}"},
            {"role": "assistant", "content": f"category: {topic}"},
        ]
    }


def jsonl(examples: list[Any]) -> bytes:
    return "".join(json.dumps(e) + "\n" for e in examples).encode()


@pytest.fixture(scope="session")
def training_bytes() -> bytes:
    """12 valid chat examples: above the 10-example minimum, tiny to train on."""
    return jsonl([chat_example(i) for i in range(12)])


@pytest.fixture(scope="session")
def validation_bytes() -> bytes:
    return jsonl([chat_example(100 + i) for i in range(4)])


def poll_until(probe: Callable[[], Any], *, timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    """Poll `probe` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="session")
def wait_for() -> Callable[..., Any]:
    """wait_for(probe, timeout_s=..., what=...): poll with a deadline instead of sleeping."""
    return poll_until


@pytest.fixture(scope="session")
def examples() -> Callable[..., list[dict[str, Any]]]:
    """examples(n, start=0): n distinct short chat examples."""

    def make(n: int, start: int = 0) -> list[dict[str, Any]]:
        return [chat_example(start + i) for i in range(n)]

    return make


@pytest.fixture(scope="session")
def to_jsonl() -> Callable[[list[Any]], bytes]:
    return jsonl


@pytest.fixture(scope="session")
def builtin_model(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    """tuneline-tiny, built once per test run (about 20 s; tests/conftest.py's model_cache) instead of
    once per state directory."""
    from tuneline.server.builtin import ensure_builtin_model

    # The same folder as test_builtin.py's fixture: whichever runs first builds, the other reuses it.
    return ensure_builtin_model(tmp_path_factory.getbasetemp() / "tuneline-tiny-state")


@pytest.fixture(scope="session")
def seeded_state(builtin_model: Path) -> Callable[[Path], Path]:
    """seeded_state(dir): a state directory that already holds the built-in model, as after a first start."""

    def seed(state_dir: Path) -> Path:
        target = state_dir / "models" / builtin_model.name
        if not target.exists():
            shutil.copytree(builtin_model, target)
        return state_dir

    return seed


@pytest.fixture(scope="module")
def server_state(tmp_path_factory: pytest.TempPathFactory, seeded_state: Callable[[Path], Path]) -> Path:
    return seeded_state(tmp_path_factory.mktemp("server-state"))


@pytest.fixture(scope="module")
def server(server_state: Path) -> Iterator[Any]:
    """One real `tuneline serve` process for the test module, on a free loopback port."""
    from tuneline.server.launcher import start_server

    with start_server(server_state, api_key=API_KEY) as process:
        yield process


@pytest.fixture(scope="module")
def client(server: Any) -> Any:
    """The real, unmodified `openai` SDK pointed at the module's server (no retries: see every error)."""
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=60.0)
