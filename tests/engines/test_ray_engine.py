"""The ray engine against the local engine, on a real local Ray with 2 CPUs: the same training,
validation and quarantine bytes and the same dataset hash, for the demo data (the planted-defect
corpus), demo data generated from another seed and generated multi-day chats; and a Ray worker killed
in the middle of a block is retried, with the same frame and no record counted twice."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'tuneline[ray]')")

from tuneline import jsonl, text_store  # noqa: E402
from tuneline.config import DEFAULT_CONFIG, load_config  # noqa: E402
from tuneline.demo import generator  # noqa: E402
from tuneline.demo.synthetic import synthetic_chat_lines  # noqa: E402
from tuneline.engines import blocks, ray_engine  # noqa: E402
from tuneline.flows.backfill import PREPARED, backfill  # noqa: E402
from tuneline.flows.prepare import PrepareResult, prepare  # noqa: E402
from tuneline.near_duplicates import (  # noqa: E402
    Documents,
    Fingerprints,
    TextTable,
    banding_for,
    local_candidates,
    pairs_of,
    signing,
)
from tuneline.normalize import normalize_text  # noqa: E402
from tuneline.signature_store import SignatureStore  # noqa: E402
from tuneline.tasks import dedupe, export, ingest, validate  # noqa: E402

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
DEMO_AS_OF = max(p.name.removeprefix("dt=") for p in (DATA_DIR / "raw" / "support").glob("dt=*"))
OUTPUTS = (export.TRAIN_FILE, export.VALIDATION_FILE, export.QUARANTINE_FILE)
BLOCK_TASK = "tuneline.screen_block"


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Any:
    """One local Ray of 2 CPUs for the module (the engine joins it instead of starting its own)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlflow")


def write_config(folder: Path, store: Path, **sections: dict[str, Any]) -> Path:
    """configs/local.yaml with MLflow in `store` and `sections` merged on top."""
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    document["tracking"] = {
        "tracking_uri": f"sqlite:///{store / 'mlflow.db'}",
        "artifact_location": str(store / "mlartifacts"),
        "experiment": "ray-engine-tests",
    }
    for section, values in sections.items():
        document[section] = {**document.get(section, {}), **values}
    path = folder / f"config-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def both_engines(folder: Path, store: Path, as_of: str, **sections: dict[str, Any]) -> list[PrepareResult]:
    """The prepare flow with the local engine, then with the ray engine (one file per Ray task)."""
    results = []
    for engine in ("local", "ray"):
        config = write_config(folder, store, execution={"engine": engine}, **sections)
        results.append(prepare(config_path=str(config), as_of=as_of, out_dir=str(folder / engine)))
    return results


def assert_same_outputs(local: PrepareResult, on_ray: PrepareResult) -> None:
    assert local.published and on_ray.published
    for name in OUTPUTS:
        assert (local.out_dir / name).read_bytes() == (on_ray.out_dir / name).read_bytes(), name
    assert local.dataset_hash == on_ray.dataset_hash
    assert local.manifest["counts"] == on_ray.manifest["counts"]
    assert local.manifest["config_hash"] == on_ray.manifest["config_hash"]


def test_demo_data_gives_the_same_files_and_hash(prefect_server: None, store: Path, tmp_path: Path) -> None:
    local, on_ray = both_engines(tmp_path, store, DEMO_AS_OF)
    assert_same_outputs(local, on_ray)
    # The planted defects are there to be found: the comparison is not between two empty files.
    reasons = local.manifest["counts"]["quarantined_by_reason"]
    assert {"secret_detected", "near_duplicate", "eval_leakage", "contradiction"} <= set(reasons)


def test_generated_demo_data_gives_the_same_files_and_hash(
    prefect_server: None, store: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    generator.generate(data, seed=20_261_205)
    days = sorted(p.name.removeprefix("dt=") for p in (data / "raw" / "support").glob("dt=*"))
    local, on_ray = both_engines(
        tmp_path,
        store,
        days[-1],
        data={
            "sources": [
                {"name": "chat", "uri": str(data / "raw" / "support" / "dt=*" / "*.jsonl")},
                {
                    "name": "csv",
                    "uri": str(data / "raw" / "support" / "dt=*" / "*.csv"),
                    "csv_mapping": {"user": "customer_message", "assistant": "agent_reply"},
                },
            ],
            "eval_set": str(data / generator.EVAL_PATH),
            "canary_set": str(data / generator.CANARY_PATH),
            "general_corpus": str(data / generator.GENERAL_PATH),
        },
    )
    assert_same_outputs(local, on_ray)
    assert local.manifest["counts"]["quarantined"] > 0


def test_several_files_per_task_give_the_same_frame(support_project: Any, tmp_path: Path) -> None:
    config_path = support_project(tmp_path, {f"2026-11-0{d}": 40 + d for d in range(1, 6)})
    config = load_config(
        config_path,
        {
            "execution.engine": "ray",
            "execution.files_per_task": 2,
            "execution.block_records": 50,
            "execution.shuffle_partitions": 3,
        },
    )
    files = ingest.select_files(config.data.sources, date(2026, 11, 5), 7).files
    assert len(blocks.plan(files, config.execution)) == 3
    local, on_ray = local_frame(config, files), ray_frame(config, files)
    pd.testing.assert_frame_equal(local, on_ray)


def local_frame(config: Any, files: list[ingest.InputFile]) -> pd.DataFrame:
    """One read of all the files in this process, and the whole of dedupe (examples as the training
    lines the screen makes of them: no rule of dedupe changes an example after the per-record ones)."""
    fallbacks = [s.csv_mapping for s in config.data.sources if s.csv_mapping is not None]
    frame = ingest.read_files(files, config.model.system_prompt, fallbacks)
    frame = validate.validate(frame, config.model, config.validation)
    return export.with_training_lines(dedupe.dedupe(frame, eval_examples(config), config.dedupe))


def ray_frame(config: Any, files: list[ingest.InputFile]) -> pd.DataFrame:
    screened = ray_engine.screen(files, config, eval_examples(config))
    out = dedupe.batch_rules(
        screened.frame,
        screened.documents,
        config.dedupe,
        ray_engine.RayCandidates(config.execution),
    )
    return text_store.unpacked(out, screened.texts)


def parsed(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:  # the generator's malformed lines
        return None


def test_the_shuffled_candidate_search_gives_the_local_pairs() -> None:
    chats = [parsed(line) for line in synthetic_chat_lines(3000, seed=7)]
    turns = [
        [normalize_text(m["content"]) for m in chat["messages"] if isinstance(m.get("content"), str)]
        for chat in chats
        if isinstance(chat, dict) and isinstance(chat.get("messages"), list)
    ]
    documents = Documents.build(TextTable(), turns)
    rank = np.random.default_rng(3).permutation(len(documents))
    banding = banding_for(64, 0.85)
    fingerprints = Fingerprints.of(documents, signing(64, 3))
    eligible = fingerprints.word_counts > 0
    eligible[::7] = False  # records an earlier rule took out: never paired
    expected = pairs_of(local_candidates(fingerprints.signatures, eligible, rank, banding), len(documents))
    assert len(expected[1]) > 100  # templated chats share buckets: there are pairs to find
    assert not np.isin(np.concatenate(expected), np.flatnonzero(~eligible)).any()
    # The batch's signatures as the engines keep them: on disk, a block at a time.
    store = SignatureStore(64)
    for start in range(0, len(documents), 1000):
        store.append(fingerprints.signatures[start : start + 1000])
    # One reducer: a map task's one return value is its entries; None: one per map task.
    for partitions in (3, 1, None):
        config = load_config(
            overrides={"execution.block_records": 300, "execution.shuffle_partitions": partitions}
        )
        for signatures in (store, fingerprints.signatures):
            pieces = list(ray_engine.RayCandidates(config.execution)(signatures, eligible, rank, banding))
            assert len(pieces) == (partitions or -(-len(documents) // 300))
            for mine, theirs in zip(pairs_of(pieces, len(documents)), expected, strict=True):
                np.testing.assert_array_equal(mine, theirs)


def eval_examples(config: Any) -> list[dict[str, Any]]:
    return [e for e in jsonl.read_set(config.data.eval_set).values if isinstance(e, dict)]


def kill_a_running_block(stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first Ray worker seen running a block (its process title names the task)."""
    me = psutil.Process()
    while not stop.is_set() and not killed:
        for process in me.children(recursive=True):
            try:
                title = " ".join(process.cmdline())
            except psutil.Error:
                continue
            if BLOCK_TASK in title and "::IDLE" not in title:
                os.kill(process.pid, signal.SIGKILL)
                killed.append(process.pid)
                return
        time.sleep(0.005)


def screen_with_a_kill(config: Any, files: list[ingest.InputFile]) -> tuple[Any, list[int]]:
    """ray_engine.screen while another thread kills a worker mid-block; (result or exception, killed pids)."""
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=kill_a_running_block, args=(stop, killed))
    killer.start()
    try:
        outcome: Any = ray_engine.screen(files, config, eval_examples(config))
    except Exception as exc:
        outcome = exc
    finally:
        stop.set()
        killer.join()
    return outcome, killed


def test_a_worker_killed_mid_block_is_retried_and_nothing_is_counted_twice(
    support_project: Any, tmp_path: Path
) -> None:
    # Blocks large enough (4 x 3,000 chats) that a worker is caught in the middle of one.
    config_path = support_project(tmp_path, {f"2026-11-0{d}": 3000 for d in range(1, 5)})
    config = load_config(config_path, {"execution.engine": "ray"})
    files = ingest.select_files(config.data.sources, date(2026, 11, 4), 7).files
    expected = local_frame(config, files)

    screened, killed = screen_with_a_kill(config, files)
    assert killed, "no worker was caught running a block"
    assert isinstance(screened, blocks.Screened), screened
    on_ray = dedupe.batch_rules(screened.frame, screened.documents, config.dedupe)
    on_ray = text_store.unpacked(on_ray, screened.texts)
    pd.testing.assert_frame_equal(expected, on_ray)
    # Every input line once: 3,002 lines per file (a malformed line and a duplicate included).
    assert len(on_ray) == 4 * 3002 == on_ray["record_id"].nunique()

    # Without retries the same kill fails the stage: the retry above is what saved it.
    no_retry = load_config(config_path, {"execution.engine": "ray", "execution.max_retries": 0})
    failed, killed = screen_with_a_kill(no_retry, files)
    assert killed
    assert isinstance(failed, ray.exceptions.RayError), failed


def test_backfill_prepares_dates_on_ray_with_the_local_engines_hashes(
    prefect_server: None, store: Path, support_project: Any, tmp_path: Path
) -> None:
    days = {"2026-11-01": 30, "2026-11-02": 30, "2026-11-03": 30}
    tracking = {"tracking_uri": f"sqlite:///{store / 'mlflow.db'}", "artifact_location": str(store / "art")}
    hashes = {}
    for engine in ("local", "ray"):
        config = support_project(tmp_path / engine, days, execution={"engine": engine}, tracking=tracking)
        result = backfill(start="2026-11-01", end="2026-11-03", config=str(config))
        assert [d.outcome for d in result.days] == [PREPARED] * 3
        hashes[engine] = [d.dataset_hash for d in result.days]
    assert hashes["ray"] == hashes["local"]
    assert len(set(hashes["ray"])) == 3  # each date's window holds more data than the last
