"""The batch's texts on disk (tuneline/text_store.py): what is packed reads back the same, from memory or
from the file, in any order asked, across read windows; what cannot be stored stays in its cell."""

from __future__ import annotations

import errno
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tuneline import records, text_store
from tuneline.text_store import NoRoomForTexts, TextStore


def frame_of(raws: list[object], examples: list[object]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            records.RECORD_ID: [f"r{i}" for i in range(len(raws))],
            records.RAW: pd.Series(raws, dtype=object),
            records.EXAMPLE: pd.Series(examples, dtype=object),
        }
    )


RAWS: list[object] = [
    '{"messages": [{"role": "user", "content": "caf\\u00e9"}]}',
    "{broken",
    "\ud800 a lone surrogate, as a decoder's surrogateescape leaves one",
    None,
    "",
    "ünïcödé ✓",
]
EXAMPLES: list[object] = [
    b'{"messages":[{"content":"caf\xc3\xa9","role":"user"}]}\n',
    None,
    b"",
    b'{"messages":[]}\n',
    {"too_big": 2**70},  # JSON cannot represent it: it stays a dict in its cell
    b'{"prompt":"x"}\n',
]


def test_packed_texts_read_back_the_same_from_memory_and_from_disk() -> None:
    frame = frame_of(RAWS, EXAMPLES)
    packed, block = text_store.pack(frame)
    assert packed[records.RAW].tolist() == [None, None, None, None, None, None]
    assert packed[records.EXAMPLE].tolist() == [None, None, None, None, {"too_big": 2**70}, None]
    assert packed[records.TEXT_AT].tolist()[3] >= 0  # an example without a raw text is stored too
    everything = np.arange(len(frame))

    # A block's store travels by pickle (the worker's result), then joins the batch's file.
    block = pickle.loads(pickle.dumps(block))
    batch = TextStore.on_disk()
    batch.append(TextStore(b"another block's texts, stored first"))
    on_disk = text_store.moved(packed, block, batch)
    for texts, stored in ((block, packed), (batch, on_disk)):
        assert text_store.raw_texts(stored, everything, texts) == RAWS
        assert text_store.examples(stored, everything, texts) == EXAMPLES
        backwards = everything[::-1]
        assert text_store.examples(stored, backwards, texts) == EXAMPLES[::-1]
        assert text_store.raw_texts(stored, [2, 0], texts) == [RAWS[2], RAWS[0]]
        assert text_store.has_example(stored).tolist() == [e is not None for e in EXAMPLES]
        pd.testing.assert_frame_equal(text_store.unpacked(stored, texts), frame)
    with pytest.raises(TypeError, match="stays in the process"):
        pickle.dumps(batch)
    # Reading a packed frame without its store is a mistake, never a silent null.
    with pytest.raises(ValueError, match="pass it"):
        text_store.examples(on_disk, everything, None)
    batch.close()


def test_reads_span_windows_and_texts_longer_than_one() -> None:
    long = "x" * (text_store._READ_WINDOW + 123)  # one text longer than a read window
    raws: list[object] = [f"line {i} " + "y" * (i % 97) for i in range(20_000)]
    raws[7_000] = long
    frame = frame_of(raws, [None] * len(raws))
    packed, block = text_store.pack(frame)
    batch = TextStore.on_disk()
    stored = text_store.moved(packed, block, batch)
    assert len(batch) > text_store._READ_WINDOW + 2**20  # several windows
    chosen = np.random.default_rng(0).permutation(len(raws))[:5_000]
    chosen = np.append(chosen, 7_000)
    assert text_store.raw_texts(stored, chosen, batch) == [raws[i] for i in chosen]
    assert text_store.raw_texts(stored, np.arange(len(raws)), batch) == raws


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_a_spilled_block_travels_as_its_file_name_and_joins_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_copy: bool
) -> None:
    """A worker's block store written to a file of its own (TextStore.spilled) pickles as the file's
    name, and its bytes join the batch's store (by copy_file_range, or read and written where the
    kernel cannot copy between the files), after which the file is gone."""
    if not kernel_copy:

        def refused(*args: object) -> int:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(text_store.os, "copy_file_range", refused)
    monkeypatch.setattr(text_store, "_READ_WINDOW", 2**16)
    raws: list[object] = [f"raw {i} " + "é" * (i % 7) + "w" * (i % 500) for i in range(8_000)]
    raws[3] = "a \ud800 lone surrogate"
    packed, block = text_store.pack(frame_of(raws, [f'{{"i":{i}}}\n'.encode() for i in range(len(raws))]))
    assert len(block) > 2 * text_store._READ_WINDOW  # more than one read-and-write where copied by hand
    normalised = text_store.StoredTexts.packed([f"norm {i}" for i in range(100)])
    spilled, spilled_normalised = block.spilled(str(tmp_path)), normalised.spilled(str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 2 and len(spilled) == len(block)
    with pytest.raises(TypeError, match="once it is appended"):
        spilled.read(np.array([0]), np.array([1]))
    sent = pickle.dumps(spilled)
    assert len(sent) < 300  # the name of the file, not its 2 MB
    batch = TextStore.on_disk()
    batch.append(TextStore(b"another block's texts, stored first"))
    stored = text_store.moved(packed, pickle.loads(sent), batch)
    moved_normalised = pickle.loads(pickle.dumps(spilled_normalised)).moved(batch)
    assert list(tmp_path.iterdir()) == []
    everything = np.arange(len(raws))
    assert text_store.raw_texts(stored, everything, batch) == raws
    assert text_store.examples(stored, everything[::-1], batch)[-1] == b'{"i":0}\n'
    assert list(moved_normalised) == [f"norm {i}" for i in range(100)]
    assert len(batch) == len("another block's texts, stored first") + len(block) + len(normalised.store)
    with pytest.raises(TypeError, match="in memory is spilled"):
        batch.spilled(str(tmp_path))
    batch.close()


FILLS_UP = """
import resource, signal, sys
from tuneline.text_store import NoRoomForTexts, TextStore
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
store = TextStore.on_disk()
first = store.append(TextStore(b"x" * 1000))
spilled = TextStore(b"z" * 10_000).spilled(sys.argv[1])  # a worker's block, written before the disk filled
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    store.append(TextStore(b"y" * 10_000))
except NoRoomForTexts as exc:
    print("refused:", exc)
try:
    store.append(spilled)
except NoRoomForTexts as exc:
    print("refused spilled:", exc)
print("kept:", len(store), store.read([first], [1000]) == [b"x" * 1000])
"""


def test_no_room_for_the_texts_is_one_clear_error_and_keeps_what_was_stored(tmp_path: Path) -> None:
    with pytest.raises(NoRoomForTexts, match=r"/nonexistent/tuneline .*point TMPDIR at a disk with room"):
        TextStore.on_disk("/nonexistent/tuneline")
    # A disk that fills up while the blocks come back: a file size limit stands in for it.
    done = subprocess.run(
        [sys.executable, "-c", FILLS_UP, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert (
        "refused: could not write the batch's raw texts, training lines and normalised texts" in done.stdout
    )
    assert "refused spilled: could not write the batch's raw texts" in done.stdout
    assert done.stdout.count("(File too large)") == 2
    assert "kept: 1000 True" in done.stdout


def test_stored_texts_read_back_in_memory_pickled_and_moved_to_disk() -> None:
    """Texts packed by a block (one byte string: it pickles), appended to a batch's store on disk
    after another block's, read back one, a few or many at a time in any order, non-ASCII and lone
    surrogates included."""
    texts = [f"text {i} " + "é" * (i % 5) + "z" * (i % 301) for i in range(3_000)]
    texts[5] = ""
    texts[17] = "a \ud800 lone surrogate"
    packed = text_store.StoredTexts.packed(texts)
    sent = pickle.loads(pickle.dumps(packed))
    assert sent.take(np.arange(len(texts))) == texts
    batch = TextStore.on_disk()
    before = text_store.StoredTexts.packed(["another block's text"]).moved(batch)
    moved = sent.moved(batch)
    assert moved.starts[0] == len("another block's text")
    chosen = np.random.default_rng(1).permutation(len(texts))
    for ids in (chosen[:3], chosen[:2_000], chosen, np.array([17, 17, 5])):
        assert moved.take(ids) == [texts[i] for i in ids]
        assert text_store.take(texts, ids) == [texts[i] for i in ids]
    assert moved[17] == texts[17] and moved[10:13] == texts[10:13] and len(moved) == len(texts)
    joined = text_store.StoredTexts.concat([before, moved.subset(np.array([4, 2]))])
    assert list(joined) == ["another block's text", texts[4], texts[2]]
    with pytest.raises(TypeError, match="stays in the process"):
        pickle.dumps(moved)
    batch.close()


def test_reads_of_texts_far_apart_read_only_the_texts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Texts far apart in the file (a record's parts: its block's system prompt, its own turns) are
    read each with its own call, not with everything between them."""
    filler = "f" * (2 * text_store._READ_GAP)
    packed = text_store.StoredTexts.packed(["near", filler, "far", filler, "farther"])
    batch = TextStore.on_disk()
    moved = packed.moved(batch)
    calls: list[int] = []
    real = text_store.os.pread

    def counted(descriptor: int, size: int, offset: int) -> bytes:
        calls.append(size)
        return real(descriptor, size, offset)

    monkeypatch.setattr(text_store.os, "pread", counted)
    many = np.array([0, 2, 4] * text_store._FEW)  # more than a few: the windowed read
    assert moved.take(many) == ["near", "far", "farther"] * text_store._FEW
    assert sorted(calls) == [3, 4, 7]
    batch.close()
