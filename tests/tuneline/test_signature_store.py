from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from tuneline.signature_store import SignatureStore
from tuneline.text_store import NoRoomForTexts


def stored(blocks: list[np.ndarray]) -> SignatureStore:
    store = SignatureStore(blocks[0].shape[1])
    for block in blocks:
        store.append(block)
    return store


def test_the_store_reads_back_what_its_blocks_hold() -> None:
    rng = np.random.default_rng(5)
    sizes = [7, 0, 1, 300, 64, 2, 129]  # an empty block, one of a single record
    blocks = [rng.integers(0, 2**32, size=(size, 48), dtype=np.uint32) for size in sizes]
    whole = np.concatenate(blocks)
    store = stored(blocks)
    assert store.shape == whole.shape and len(store) == len(whole)

    for index in (0, 1, 47):
        np.testing.assert_array_equal(store.column(index), whole[:, index])
    # Ranges that start and end inside blocks, span several, or hold nothing.
    for start, stop in [(0, len(whole)), (3, 9), (8, 8), (5, 400), (371, 372), (400, len(whole))]:
        np.testing.assert_array_equal(store.column(13, start, stop), whole[start:stop, 13])
        np.testing.assert_array_equal(store.rows(start, stop), whole[start:stop])
    np.testing.assert_array_equal(store.columns(16, 32), whole[:, 16:32])
    assert store.columns(0, 16).flags.c_contiguous  # a record's values are one cache line
    indices = rng.integers(0, len(whole), size=200)
    np.testing.assert_array_equal(store.take(indices), whole[indices])
    store.close()


def test_a_block_of_another_width_is_refused_and_the_store_stays_in_its_process() -> None:
    store = SignatureStore(16)
    with pytest.raises(ValueError, match="16 permutations"):
        store.append(np.zeros((3, 8), dtype=np.uint32))
    with pytest.raises(TypeError, match="stays in the process"):
        pickle.dumps(store)


def test_no_room_for_the_signatures_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NoRoomForTexts, match=r"MinHash signatures.*TMPDIR"):
        SignatureStore(64, directory=str(tmp_path / "missing"))
