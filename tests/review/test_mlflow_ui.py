"""What a reviewer sees in the MLflow UI after a retrain, checked in headless Chromium.

A small retrain (one day of raw partitions, one epoch of tuneline-tiny on `tuneline serve`, real
Prefect) runs into a temporary MLflow store that already has a champion (the base model, registered
as a night before would have); `mlflow server` serves the UI on a free port, and Playwright drives the
system's Chromium (`apt-get install chromium`) through the pages a reviewer opens:
- the run page shows the training set's dataset digest and the promotion decision tag;
- the evaluation view lists the eval examples with the candidate's and the champion's answers;
- the registered model's page shows the `champion` alias on the version the retrain promoted.
Screenshots go to the folder the test prints (TUNELINE_SCREENSHOTS, else pytest's temp folder).
Skipped, saying why, when Chromium or Playwright is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tuneline import tracking
from tuneline.config import load_config
from tuneline.flows.retrain import retrain
from tuneline.server.launcher import ServerProcess, free_port, start_server

pytestmark = pytest.mark.browser

KEY = "sk-review-tests-5e6f7a8b9c0d"
DAY = "2026-11-20"
CHROMIUM_PATHS = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")


def chromium_path() -> str | None:
    """The distribution's Chromium binary (TUNELINE_CHROMIUM overrides), None when there is none."""
    candidates = [os.environ.get("TUNELINE_CHROMIUM", ""), *CHROMIUM_PATHS, shutil.which("chromium") or ""]
    return next((path for path in candidates if path and os.access(path, os.X_OK)), None)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """A headless Chromium driven by Playwright (skipped with the reason when either is missing)."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed: pip install -e '.[dev]'"
    )
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium found: apt-get install -y chromium (or set TUNELINE_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def provider_server(
    tmp_path_factory: pytest.TempPathFactory, seeded_state: Callable[[Path], Path]
) -> Iterator[ServerProcess]:
    with start_server(seeded_state(tmp_path_factory.mktemp("review-server")), api_key=KEY) as process:
        yield process


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("TUNELINE_SCREENSHOTS") or tmp_path_factory.mktemp("mlflow-ui-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nMLflow UI screenshots: {folder}")
    return folder


def start_ui(config_path: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    """`mlflow server` on the config's store (the command `tuneline ui` runs) on a free port."""
    config = load_config(config_path)
    port = free_port()
    log_path = config_path.parent / "mlflow-server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            tracking.ui_command(config.tracking, port), stdout=log, stderr=subprocess.STDOUT
        )
    return process, port, log_path


def wait_for_ui(process: subprocess.Popen[bytes], port: int, log_path: Path) -> str:
    url = f"http://{tracking.UI_HOST}:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, f"mlflow server exited:\n{log_path.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"mlflow server did not answer within 120 s:\n{log_path.read_text()[-3000:]}")


def seed_champion(config_path: Path) -> str:
    """Version 1 of the registered model, holding `champion`: the base model, as a night before left it."""
    config = load_config(config_path)
    seed = tracking.RunLog.start(config.tracking, flow="retrain", name="an earlier night")
    record = tracking.register_external_model(
        config.tracking, seed.run_id, config.model.base, params={"provider": "local"}, tags={}, metrics={}
    )
    tracking.set_alias(config.tracking, tracking.CHAMPION, record.version)
    seed.finish()
    return record.version


@pytest.fixture(scope="module")
def reviewed_run(
    tmp_path_factory: pytest.TempPathFactory,
    prefect_server: None,
    provider_server: ServerProcess,
    support_project: Callable[..., Path],
) -> Iterator[dict[str, Any]]:
    """A retrain that promoted its candidate over a champion, and the MLflow UI serving its store."""
    root = tmp_path_factory.mktemp("review")
    config_path = support_project(
        root,
        {DAY: 16},
        provider={"kind": "local", "base_url": provider_server.base_url, "poll_interval_s": 0.2},
        training={"hyperparameters": {"n_epochs": 1, "batch_size": 4}, "runs_dir": str(root / "runs")},
        evaluation={"few_shot_k": 0, "bootstrap_samples": 100, "max_tokens": 8},
        # A lenient gate: this test is about what the UI shows of a promotion, not about the gate.
        promotion={"min_delta": 0.0, "alpha": 1.0, "max_canary_drop": 1.0},
    )
    os.environ["TUNELINE_API_KEY"] = KEY
    started = time.monotonic()
    champion_before = seed_champion(config_path)
    # The UI server starts while the retrain runs (it only reads the store when a page asks).
    process, port, log_path = start_ui(config_path)
    try:
        result = retrain(config_path=str(config_path), as_of=DAY)
        assert result.promoted, result.decision
        trained = time.monotonic()
        url = wait_for_ui(process, port, log_path)
        print(f"\nretrain {trained - started:.1f} s, then the UI {time.monotonic() - trained:.1f} s more")
        yield {
            "config": load_config(config_path),
            "result": result,
            "url": url,
            "port": port,
            "champion_before": champion_before,
            "log": log_path,
        }
    finally:
        process.terminate()
        process.wait(timeout=30)


def open_page(browser: Any, url: str) -> Any:
    """A page at `url`, with the MLflow Assistant's side panel closed (it hides half of the page)."""
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(60_000)  # the first page loads the UI's bundle, on a busy CI machine
    page.goto(url)
    close = page.locator('[aria-label="Close"]').first
    close.wait_for()
    close.click()
    return page


def test_the_run_page_shows_the_dataset_digest_and_the_decision(
    chromium: Any, reviewed_run: dict[str, Any], screenshots: Path
) -> None:
    config, result = reviewed_run["config"], reviewed_run["result"]
    page = open_page(
        chromium,
        tracking.run_url(config.tracking, result.mlflow_run_id).replace(
            tracking.ui_url(config.tracking), reviewed_run["url"]
        ),
    )
    digest = result.dataset_hash[:36]
    page.get_by_text("tuneline.promotion").first.wait_for()
    page.get_by_text(digest[:8]).first.wait_for()
    page.screenshot(path=str(screenshots / "run-page.png"), full_page=True)
    body = page.inner_text("body")
    assert "promoted" in body
    assert f"{config.project}-prepared" in body


def test_the_evaluation_view_lists_candidate_and_champion_answers(
    chromium: Any, reviewed_run: dict[str, Any], screenshots: Path
) -> None:
    config, result = reviewed_run["config"], reviewed_run["result"]
    experiment_id = tracking.configure(config.tracking)
    page = open_page(
        chromium,
        f"{reviewed_run['url']}/#/experiments/{experiment_id}/evaluation-runs?selectedRunUuid={result.mlflow_run_id}",
    )
    # Selecting the run in the list opens its evaluation: a row per eval example with its question,
    # every model's answer, the reference and the verdicts.
    page.get_by_text(f"retrain {DAY}").first.click()
    try:
        page.get_by_text("Where is the parcel I ordered last week?").first.wait_for()
        page.get_by_text("What is the capital of France?").first.wait_for()
    finally:
        page.screenshot(path=str(screenshots / "evaluation-view.png"), full_page=True)
    rows = page.locator('text=/\\{"candidate": .*"champion": /').all_inner_texts()
    assert len(rows) == 3, rows  # one task and two canary examples
    assert "exact_match" in page.inner_text("body")


def test_the_model_page_shows_champion_on_the_promoted_version(
    chromium: Any, reviewed_run: dict[str, Any], screenshots: Path
) -> None:
    config, result = reviewed_run["config"], reviewed_run["result"]
    assert result.champion_version != reviewed_run["champion_before"]
    url = tracking.model_version_url(config.tracking, str(result.champion_version), reviewed_run["port"])
    page = open_page(chromium, url)
    page.get_by_text("champion").first.wait_for()
    page.get_by_text("Promoted").first.wait_for()
    page.screenshot(path=str(screenshots / "model-version.png"), full_page=True)
    body = page.inner_text("body")
    assert "tuneline.alias_history" in body and "tuneline.run_url" in body
