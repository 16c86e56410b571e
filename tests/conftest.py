"""Shared fixtures. Tests never reach the network: tests marked `openai` call api.openai.com and run
only with --run-openai and OPENAI_API_KEY set."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# The project folder of every test (tuneline/paths.py) is this repository, wherever pytest is started.
os.environ["TUNELINE_PROJECT"] = str(Path(__file__).resolve().parents[1])


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-openai", action="store_true", help="run tests that call api.openai.com (costs money)"
    )


def pytest_configure(config: pytest.Config) -> None:
    # `-n 2 --dist loadfile` (make test): xdist would hand out the files with the most tests first, which
    # leaves this suite's longest files (few tests, each an end-to-end run) for the end, where one
    # worker runs them while the other has nothing left. In collection order the many quick files of
    # tests/tuneline/ come last and even the two workers out (what --no-loadscope-reorder does).
    if getattr(config.option, "dist", "no") == "loadfile":
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_openai = config.getoption("--run-openai") and os.environ.get("OPENAI_API_KEY")
    skip = pytest.mark.skip(reason="calls api.openai.com: pass --run-openai and set OPENAI_API_KEY")
    for item in items:
        if "openai" in item.keywords and not run_openai:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """A real ephemeral Prefect server (SQLite in a temp dir) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    with prefect_test_harness(server_startup_timeout=120):
        yield


class ScriptedProvider:
    """A real HTTP server on loopback that answers each (method, path) with the next scripted
    (status, body, headers), and 200 with an empty list when the script runs out: a provider's refusals
    (401, 403, daily caps, 5xx, files in `error` status) that tuneline's own server never gives.
    `seen` records every request (method, path, headers)."""

    def __init__(self) -> None:
        self.script: dict[tuple[str, str], list[tuple[int, dict[str, Any], dict[str, str]]]] = {}
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                path = self.path.split("?")[0]
                owner.seen.append((self.command, path, dict(self.headers)))
                queue = owner.script.get((self.command, path)) or []
                status, body, headers = queue.pop(0) if queue else (200, {"object": "list", "data": []}, {})
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def answer(self, method: str, path: str, *responses: tuple[int, dict[str, Any], dict[str, str]]) -> None:
        self.script.setdefault((method, path), []).extend(responses)

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.seen if (m, p) == (method, path))


@pytest.fixture
def scripted_provider() -> Iterator[ScriptedProvider]:
    provider = ScriptedProvider()
    thread = threading.Thread(target=provider.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield provider
    provider.server.shutdown()
    provider.server.server_close()


_SUPPORT_ISSUES = (
    ("billing", "my invoice shows a double charge"),
    ("shipping", "the parcel never arrived"),
    ("account", "I cannot log in to my account"),
    ("technical", "the app crashes when I open settings"),
    ("billing", "I want a refund for my order"),
    ("account", "my password reset email is missing"),
    ("shipping", "the tracking number does not work"),
    ("technical", "the screen stays black on startup"),
)


@pytest.fixture(scope="session")  # a plain function: module-scoped fixtures (tests/review) use it too
def support_project() -> Callable[..., Path]:
    """`support_project(root, {day: n}, **sections)` writes a small project; see _write_support_project."""
    return _write_support_project


def _write_support_project(root: Path, days: dict[str, int], **config: Any) -> Path:
    """A small project in `root`: per day, `n` distinct support chats plus one malformed JSON line and
    one exact duplicate (so every day quarantines one `invalid_json` and one `exact_duplicate`), an eval
    set, and a config with its MLflow store and backfill work dir in `root`. Returns the config path.
    `config` sets top-level sections on top (e.g. backfill={"concurrency": 1})."""
    for day_number, (day, n) in enumerate(sorted(days.items()), start=1):
        lines = []
        for i in range(n):
            category, issue = _SUPPORT_ISSUES[i % len(_SUPPORT_ISSUES)]
            case = f"{day_number}{i:03d}"
            question = f"Hello, {issue}. Case {case}, customer ref C{day_number * 997 + i * 31}."
            answer = f"Category: {category}. Thanks for case {case}; we are on it."
            turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            lines.append(json.dumps({"messages": turns}))
        lines += ['{"messages": [', lines[0]]
        partition = root / "raw" / f"dt={day}" / "part-0.jsonl"
        partition.parent.mkdir(parents=True, exist_ok=True)
        partition.write_text("\n".join(lines) + "\n")
    eval_example = {
        "messages": [
            {"role": "user", "content": "Where is the parcel I ordered last week?"},
            {"role": "assistant", "content": "Category: shipping."},
        ]
    }
    (root / "eval.jsonl").write_text(json.dumps(eval_example) + "\n")
    canary = [("What is the capital of France?", "Paris."), ("How many days are in a week?", "Seven.")]
    (root / "canary.jsonl").write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]})
            + "\n"
            for q, r in canary
        )
    )
    document: dict[str, Any] = {
        "data": {
            "sources": [{"name": "support", "uri": str(root / "raw" / "dt=*" / "*.jsonl")}],
            "lookback_days": 7,
            "eval_set": str(root / "eval.jsonl"),
            "canary_set": str(root / "canary.jsonl"),
        },
        "export": {"general_mix_fraction": 0.0},
        "tracking": {
            "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
            "artifact_location": str(root / "mlartifacts"),
            "experiment": "tests",
        },
        "server": {"state_dir": str(root / "server")},
        "backfill": {"work_dir": str(root / "backfill"), "concurrency": 2},
    }
    for section, values in config.items():
        document[section] = {**document.get(section, {}), **values}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


# tuneline/server/builtin.py's MODEL_CACHE_ENV (not imported here: that module imports torch).
MODEL_CACHE_ENV = "TUNELINE_MODEL_CACHE"


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One build of tuneline-tiny for the whole run: the builds are kept by fingerprint in a folder of
    the run's temp folder that the xdist workers share (builtin.py builds under a file lock, so a
    second worker waits for the first one's build), and every state directory gets a copy, both the
    fixtures' below and those of the servers the tests start (they inherit the variable)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the controller's folder, above each worker's popen-gwN
    cache = base / "tuneline-model-cache"
    before = os.environ.get(MODEL_CACHE_ENV)
    os.environ[MODEL_CACHE_ENV] = str(cache)
    yield cache
    if before is None:
        os.environ.pop(MODEL_CACHE_ENV, None)
    else:
        os.environ[MODEL_CACHE_ENV] = before


@pytest.fixture(scope="session")
def builtin_model(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    """tuneline-tiny, built once per test run (see model_cache) instead of once per state directory."""
    from tuneline.server import builtin

    assert builtin.MODEL_CACHE_ENV == MODEL_CACHE_ENV
    return builtin.ensure_builtin_model(tmp_path_factory.mktemp("builtin-cache"))


@pytest.fixture(scope="session")
def seeded_state(builtin_model: Path) -> Callable[[Path], Path]:
    """seeded_state(dir): a server state directory that already holds the built-in model, as after a
    first start (the server checks the model's fingerprint and uses it)."""

    def seed(state_dir: Path) -> Path:
        target = state_dir / "models" / builtin_model.name
        if not target.exists():
            shutil.copytree(builtin_model, target)
        return state_dir

    return seed
