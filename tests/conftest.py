"""Shared fixtures. Tests never reach the network: tests marked `openai` call api.openai.com and run
only with --run-openai and OPENAI_API_KEY set."""

from __future__ import annotations

import os

import pytest

os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-openai", action="store_true", help="run tests that call api.openai.com (costs money)")


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
