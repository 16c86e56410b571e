"""The local engine: a large JSONL file read as line-aligned parts gives the records of one read; the
blocks run in a pool of worker processes give the frame and normalised Documents of one pass in this
process, and so the same dedupe; so do the blocks screened here while a cold fork server starts; a
worker killed mid-block has its blocks read again here."""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pytest

from tuneline import fork_server, jsonl, records, text_store
from tuneline.config import load_config
from tuneline.engines import blocks, local
from tuneline.flows.backfill import PREPARED, backfill
from tuneline.near_duplicates import Fingerprints, signing
from tuneline.signature_store import SignatureStore
from tuneline.tasks import dedupe, export, ingest, validate


def whole_file(path: Path) -> ingest.InputFile:
    return ingest.InputFile("s", str(path), "raw/part.jsonl", "2026-11-01", "jsonl", None)


def test_line_ranges_read_one_after_the_other_give_the_records_of_the_whole_file(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}
    lines = [b"\xef\xbb\xbf" + json.dumps(chat).encode()]  # a byte-order mark opens the file
    for index in range(40):
        lines.append(json.dumps({**chat, "n": index}).encode() + (b"\r" if index % 3 == 0 else b""))
        if index % 7 == 0:
            lines.append(b"")  # blank lines hold no record but count
        if index % 11 == 0:
            lines.append(b'{"messages": [')  # not JSON
    path = tmp_path / "part.jsonl"
    path.write_bytes(b"\n".join(lines))  # the last line has no line end
    file = whole_file(path)

    parts = ingest.line_ranges(file, 300)
    assert len(parts) > 5
    assert parts[0].start == 0 and parts[-1].stop is None
    assert all(a.stop == b.start for a, b in itertools.pairwise(parts))
    data = path.read_bytes()
    assert all(data[part.start - 1 : part.start] == b"\n" for part in parts[1:])  # cut at line ends
    assert [p.first_line for p in parts[1:]] == [data[: p.start].count(b"\n") + 1 for p in parts[1:]]

    whole = ingest.read_files([file], None)
    pieces = pd.concat([ingest.read_files([part], None) for part in parts], ignore_index=True)
    pd.testing.assert_frame_equal(whole, pieces)
    assert whole["line"].tolist()[:2] == [1, 2] and (whole["reason"] == "invalid_json").sum() == 4
    # A small file, or a compressed one, is never cut.
    assert ingest.line_ranges(file, len(data)) == [file]
    gz = ingest.InputFile("s", str(path), "raw/part.jsonl.gz", "", "jsonl", None)
    assert ingest.line_ranges(gz, 10) == [gz]


@pytest.fixture()
def project(support_project: Any, tmp_path: Path) -> Any:
    """Five days of 400 chats each (about 60 kB a file) and the config to read them."""
    config_path = support_project(tmp_path, {f"2026-11-0{d}": 400 for d in range(1, 6)})
    return load_config(config_path)


def validated(config: Any, files: list[ingest.InputFile]) -> pd.DataFrame:
    """One read of all the files in this process, validated."""
    frame = ingest.read_files(files, config.model.system_prompt)
    return validate.validate(frame, config.model, config.validation)


def one_pass(config: Any, files: list[ingest.InputFile]) -> tuple[pd.DataFrame, Any]:
    """The reference: one read of all the files in this process, and the per-record rules (examples
    then as the training lines the screen makes of them)."""
    frame, documents = dedupe.per_record_rules(validated(config, files), eval_examples(config), config.dedupe)
    return export.with_training_lines(frame), documents


def eval_examples(config: Any) -> list[dict[str, Any]]:
    return [e for e in jsonl.read_set(config.data.eval_set).values if isinstance(e, dict)]


def on_pool(config: Any, **execution: Any) -> Any:
    return config.model_copy(update={"execution": config.execution.model_copy(update=execution)})


def assert_same(screened: blocks.Screened, frame: pd.DataFrame, documents: Any) -> None:
    """The same frame, and Documents with the same texts for every record (the texts' ids in the table
    may differ: each block's table also holds the eval prompts, which come first in the merged one)."""
    assert screened.frame[records.RAW].isna().all()  # every raw text is in the store, not the frame
    pd.testing.assert_frame_equal(text_store.unpacked(screened.frame, screened.texts), frame)
    mine, theirs = screened.documents, documents
    assert [mine.table.texts[p] for p in mine.parts] == [theirs.table.texts[p] for p in theirs.parts]
    np.testing.assert_array_equal(mine.offsets, theirs.offsets)


def test_blocks_in_worker_processes_give_the_result_of_one_pass(
    project: Any, caplog: pytest.LogCaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = ingest.select_files(project.data.sources, date(2026, 11, 5), 7).files
    frame, documents = one_pass(project, files)
    config = on_pool(project, workers=2, block_bytes=20_000)
    assert len(blocks.plan(files, config.execution)) > len(files)  # each file cut into parts
    # A warm server: every block goes to the pool (a cold one's start has blocks screened here, below).
    fork_server.start()

    # The workers' texts come back through files of a temporary directory, gone when the screen is done.
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    with caplog.at_level(logging.INFO, logger="tuneline.engines.local"):
        screened = local.screen(files, config, eval_examples(config))
    assert "on 2 process(es), 0 of them here" in caplog.text
    assert [path.name for path in temporary.iterdir() if path.name.startswith("tuneline-")] == []
    assert_same(screened, frame, documents)
    # The blocks' sources, partitions and kinds joined as one categorical each, not strings a row.
    for column in (records.SOURCE, records.PARTITION, records.KIND):
        assert isinstance(screened.frame[column].dtype, pd.CategoricalDtype)
    assert screened.frame[records.SOURCE].nunique() == len(files) > 1
    # The blocks signed their records: the fingerprints that came back are those of one pass, and
    # the words, which did not come back, are made again on demand as they were.
    assert not screened.documents.table.has_words()
    made = Fingerprints.of(documents, signing(config.dedupe.num_perm, config.dedupe.shingle_size))
    came = screened.documents.fingerprints
    assert came is not None and len(came.content) == len(documents)
    # The signatures wait in the batch's store on disk (tuneline/signature_store.py).
    assert isinstance(came.signatures, SignatureStore)
    for mine, theirs in zip(
        (came.content, came.word_counts, came.signatures.rows(0, len(documents))),
        (made.content, made.word_counts, made.signatures),
        strict=True,
    ):
        np.testing.assert_array_equal(mine, theirs)
    for mine, theirs in zip(screened.documents.words(), documents.words(), strict=True):
        np.testing.assert_array_equal(mine, theirs)

    out = dedupe.batch_rules(screened.frame, screened.documents, config.dedupe)
    out = text_store.unpacked(out, screened.texts)
    whole = export.with_training_lines(
        dedupe.dedupe(validated(project, files), eval_examples(project), config.dedupe)
    )
    pd.testing.assert_frame_equal(out, whole)
    assert (out["reason"] == "invalid_json").sum() == 5 == (out["reason"] == "exact_duplicate").sum()

    # One block's worth of input, or one worker: read in this process, the same result.
    for single in (on_pool(project, workers=1, block_bytes=20_000), project):
        assert_same(local.screen(files, single, eval_examples(single)), frame, documents)


def kill_a_pool_worker(stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first worker of the fork server (its child) seen at work on a block."""
    me = psutil.Process()
    while not stop.is_set() and not killed:
        for process in me.children(recursive=True):
            try:
                parent = process.parent()
                server = parent is not None and "forkserver" in " ".join(parent.cmdline())
                # 0.1 s of CPU: into its first block (a block of these takes a worker 0.1 to 0.2 s).
                busy = server and process.cpu_times().user > 0.1
            except psutil.Error:
                continue
            if busy:
                os.kill(process.pid, signal.SIGKILL)
                killed.append(process.pid)
                return
        time.sleep(0.01)


def test_a_worker_killed_mid_block_has_its_blocks_read_again_here(
    support_project: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Blocks large enough (4 x 3,000 chats, two parts each) that a worker is caught at work on one.
    config_path = support_project(tmp_path, {f"2026-11-0{d}": 3000 for d in range(1, 5)})
    config = on_pool(load_config(config_path), workers=2, block_bytes=250_000)
    files = ingest.select_files(config.data.sources, date(2026, 11, 4), 7).files
    frame, documents = one_pass(config, files)
    fork_server.start()  # every block to the pool

    stop, killed = threading.Event(), []
    killer = threading.Thread(target=kill_a_pool_worker, args=(stop, killed))
    killer.start()
    try:
        with caplog.at_level(logging.WARNING, logger="tuneline.engines.local"):
            screened = local.screen(files, config, eval_examples(config))
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was caught at work"
    assert "a worker process died or could not start" in caplog.text
    assert_same(screened, frame, documents)
    # Every input line once: 3,002 lines per file (a malformed line and a duplicate included).
    assert len(screened.frame) == 4 * 3002 == screened.frame["record_id"].nunique()


def test_backfill_dates_prepared_at_once_on_worker_pools_give_the_hashes_of_one_process(
    prefect_server: None, support_project: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The flow's path with the pool: backfill dates prepared two at a time (threads of one flow, each
    starting its own pool from the shared fork server), against everything in the flow's process."""
    days = {"2026-11-01": 150, "2026-11-02": 150, "2026-11-03": 150}
    store = tmp_path / "mlflow"
    tracking = {"tracking_uri": f"sqlite:///{store / 'mlflow.db'}", "artifact_location": str(store / "art")}
    hashes = {}
    for workers in (1, 2):
        config = support_project(
            tmp_path / f"workers-{workers}",
            days,
            execution={"workers": workers, "block_bytes": 8_000},
            backfill={"concurrency": 2},
            tracking=tracking,
        )
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tuneline.engines.local"):
            result = backfill(start="2026-11-01", end="2026-11-03", config=str(config))
        assert [d.outcome for d in result.days] == [PREPARED] * 3
        # Each date's 1 to 3 files, cut into parts of 8 kB, on two processes (none with one worker).
        assert caplog.text.count("on 2 process(es)") == (3 if workers == 2 else 0), caplog.text
        hashes[workers] = [d.dataset_hash for d in result.days]
    assert hashes[2] == hashes[1]
    assert len(set(hashes[2])) == 3  # each date's window holds more data than the last


# Run in a process of its own, whose fork server is not running yet.
_COLD_START = """
import logging, sys
from datetime import date
import pandas as pd
from tuneline import jsonl, text_store
from tuneline.config import load_config
from tuneline.engines import local
from tuneline.tasks import ingest

def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    config = load_config(sys.argv[1])
    examples = [e for e in jsonl.read_set(config.data.eval_set).values if isinstance(e, dict)]
    files = ingest.select_files(config.data.sources, date(2026, 11, 5), 7).files
    single = config.model_copy(update={"execution": config.execution.model_copy(update={"workers": 1})})
    pooled = config.model_copy(
        update={"execution": config.execution.model_copy(update={"workers": 2, "block_bytes": 20_000})}
    )
    one = local.screen(files, single, examples)  # in this process: no fork server yet
    blocks = local.screen(files, pooled, examples)
    pd.testing.assert_frame_equal(
        text_store.unpacked(blocks.frame, blocks.texts), text_store.unpacked(one.frame, one.texts)
    )
    mine, theirs = blocks.documents, one.documents
    assert [mine.table.texts[p] for p in mine.parts] == [theirs.table.texts[p] for p in theirs.parts]
    print("SAME")

if __name__ == "__main__":
    main()
"""


def test_blocks_screened_here_while_a_cold_fork_server_starts_give_the_same_result(
    support_project: Any, tmp_path: Path
) -> None:
    config_path = support_project(tmp_path, {f"2026-11-0{d}": 400 for d in range(1, 6)})
    script = tmp_path / "cold_start.py"
    script.write_text(_COLD_START)
    run = subprocess.run(
        [sys.executable, str(script), str(config_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("SAME")
    said = [line for line in run.stdout.splitlines() if "here while the fork server started" in line]
    assert len(said) == 1, run.stdout
    here = int(said[0].split(", ")[1].split(" of them")[0])
    total = int(said[0].split(" in ")[1].split(" block")[0])
    # The server's first start imports the block code (seconds): this process screened blocks meanwhile.
    assert 1 <= here <= total
