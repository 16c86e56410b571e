from __future__ import annotations

import json
import pickle
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash

from tuneline import near_duplicates as nd
from tuneline.config import load_config
from tuneline.demo.synthetic import synthetic_chat_lines
from tuneline.engines import blocks
from tuneline.near_duplicates import (
    Documents,
    Fingerprints,
    TextTable,
    banding_for,
    candidate_pairs,
    content_hashes,
    find_exact_duplicates,
    find_matches,
    find_near_duplicates,
    minhash,
    shingles_of_words,
    sketches,
)
from tuneline.normalize import jaccard, word_shingles
from tuneline.signature_store import SignatureStore
from tuneline.text_store import StoredTexts, TextStore

VOCABULARY = [f"w{i}" for i in range(400)]


def sentence(rng: random.Random, length: int = 40) -> str:
    return " ".join(rng.choice(VOCABULARY) for _ in range(length))


def changed(text: str, rng: random.Random, edits: int) -> str:
    words = text.split()
    for _ in range(edits):
        words[rng.randrange(len(words))] = f"x{rng.randrange(10**6)}"
    return " ".join(words)


def brute_force(texts: list[str], threshold: float, size: int = 3) -> np.ndarray:
    """The near-duplicate rule by definition: every earlier kept record, in order."""
    sets = [word_shingles(t, size) for t in texts]
    duplicate_of = np.full(len(texts), -1)
    for i in range(len(texts)):
        for j in range(i):
            if duplicate_of[j] < 0 and sets[i] and jaccard(sets[i], sets[j]) >= threshold:
                duplicate_of[i] = j
                break
    return duplicate_of


def test_signatures_equal_datasketch_bit_for_bit() -> None:
    rng = random.Random(1)
    documents = Documents.of_texts([sentence(rng, n) for n in (1, 2, 3, 10, 57)] + [""])
    shingles, offsets = shingles_of_words(*documents.words(), 3)
    signatures = minhash(shingles, offsets, nd.permutations(64))
    for i in range(len(documents)):
        reference = MinHash(num_perm=64, scheme="affine32", hashfunc=lambda value: value)
        reference.update_batch((shingles[offsets[i] : offsets[i + 1]] >> np.uint64(32)).tolist())
        assert (signatures[i] == reference.hashvalues).all()


def test_hashed_shingles_match_the_shingle_definition() -> None:
    texts = ["a b c d", "a b c", "a b", "", "b c d a b c"]
    shingles, offsets = shingles_of_words(*Documents.of_texts(texts).words(), 3)
    for i, text in enumerate(texts):
        assert len(set(shingles[offsets[i] : offsets[i + 1]].tolist())) == len(word_shingles(text, 3))
    # "a b c" occurs in the first and last text and hashes equal there; "a b" (short text) is its own.
    assert shingles[offsets[0]] == shingles[offsets[4] + 3]
    assert shingles[offsets[2]] not in set(shingles[offsets[0] : offsets[1]].tolist())


def test_documents_join_their_parts_and_keep_word_hashes_stable() -> None:
    table = TextTable()
    documents = Documents.build(table, [["user", "hello there"], ["user", "", "hello", "there"]])
    assert documents.text(0) == documents.text(1) == "user hello there"
    first, offsets = documents.words()
    assert list(offsets) == [0, 3, 6]
    again, _ = Documents.of_texts(["user hello there"]).words()
    assert (first[:3] == again).all()  # blake2b of the words: the same in any table or process
    assert documents.subset(np.array([1])).text(0) == "user hello there"


def test_a_table_without_its_index_interns_as_before() -> None:
    """A table sent to another process, or put together from blocks, drops its text -> id index (about
    55 bytes a text) and builds it again only if a text is interned."""
    first = Documents.build(TextTable(), [["user", "hello there"], ["assistant", "hi"]])
    second = Documents.build(TextTable(), [["user", "bye"], ["assistant", "hi"]])
    sent = pickle.loads(pickle.dumps(first))
    assert sent.table._ids is None
    assert [sent.table.intern(t) for t in ("hi", "user", "new")] == [3, 0, 4]
    joined = Documents.concat([first, second])
    assert joined.table._ids is None
    assert [joined.text(k) for k in range(4)] == [
        "user hello there",
        "assistant hi",
        "user bye",
        "assistant hi",
    ]
    assert joined.table.intern("bye") == joined.table.texts.index("bye")
    assert joined.table.intern("another") == len(joined.table) - 1


def test_exact_duplicates_are_equal_texts_whatever_their_parts() -> None:
    table = TextTable()
    documents = Documents.build(table, [["a b", "c"], ["x"], ["a", "b c"], ["x"], ["a b c d"]])
    assert len(set(content_hashes(documents).tolist())) == 3
    rank = np.array([4, 3, 2, 1, 0])  # the last records come first
    assert list(find_exact_duplicates(documents, rank)) == [2, 3, -1, -1, -1]


def test_banding_meets_the_recall_at_the_threshold() -> None:
    banding = banding_for(64, 0.85)
    assert banding.bands * banding.rows <= 64
    assert banding.candidate_probability(0.85) >= nd.RECALL
    assert banding.candidate_probability(0.5) < 0.5  # its 50% point lies below the threshold


def test_candidate_pairs_are_bounded_per_record() -> None:
    # Every record in one bucket of every band: the worst case stays linear.
    n = 500
    keys = np.zeros((12, n), dtype=np.uint64)
    later, earlier = candidate_pairs(keys, np.arange(n), np.ones(n, dtype=bool))
    assert len(later) <= n * (nd.NEIGHBOURS + 1)
    assert (later > earlier).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_near_duplicates_follow_the_definition(seed: int) -> None:
    """No false positive ever; every near-duplicate at Jaccard >= 0.9 found; right at the threshold
    the search is probabilistic (LSH and the agreement filter), so most are."""
    rng = random.Random(seed)
    originals = [sentence(rng, 100) for _ in range(150)]
    texts = list(originals)
    for _ in range(150):  # variants at every distance from their original: 1 to 6 words changed
        texts.append(changed(rng.choice(originals), rng, rng.randint(1, 6)))
    rng.shuffle(texts)
    found = find_near_duplicates(
        Documents.of_texts(texts), np.arange(len(texts)), threshold=0.85, num_perm=64, shingle_size=3
    )
    sets = [word_shingles(t, 3) for t in texts]
    for i in np.flatnonzero(found.duplicate_of >= 0):
        j = found.duplicate_of[i]
        assert j < i and found.duplicate_of[j] < 0
        assert jaccard(sets[i], sets[j]) >= 0.85 and found.similarity[i] == jaccard(sets[i], sets[j])
    missed = 0
    for i in np.flatnonzero(found.duplicate_of < 0):
        best = max((jaccard(sets[i], sets[k]) for k in range(i) if found.duplicate_of[k] < 0), default=0.0)
        assert best < 0.9, (i, best)
        missed += best >= 0.85
    reported = int((found.duplicate_of >= 0).sum())
    assert reported >= 40 and missed <= reported // 40, (reported, missed)


def test_per_text_signatures_are_made_a_batch_at_a_time_and_give_the_same_sketches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Per-text signatures (0.25 GB a million records) are made for one batch of records at a time and
    never kept, and the per-text shingles are gone once the records are signed: signing in batches of
    a few records, with texts shared across batches, gives the sketches of one batch, and a second
    search finds the same. A text's signature is the MinHash of its shingles."""
    rng = random.Random(3)
    originals = [sentence(rng, 60) for _ in range(40)]
    texts = originals + [changed(text, rng, 1) for text in originals]
    documents = Documents.build(TextTable(), ([text, originals[k % 5]] for k, text in enumerate(texts)))
    whole = sketches(documents, nd.signing(64, 3))
    first = find_near_duplicates(
        documents, np.arange(len(texts)), threshold=0.85, num_perm=64, shingle_size=3
    )
    assert not documents.table._inner and not documents.table._word_hash  # caches let go
    assert (first.duplicate_of[40:] >= 0).sum() >= 30
    monkeypatch.setattr(nd, "BATCH", 7)
    batched = sketches(documents, nd.signing(64, 3))
    assert np.array_equal(whole[0], batched[0]) and np.array_equal(whole[1], batched[1])
    again = find_near_duplicates(
        documents, np.arange(len(texts)), threshold=0.85, num_perm=64, shingle_size=3
    )
    assert np.array_equal(first.duplicate_of, again.duplicate_of)
    assert np.array_equal(first.similarity, again.similarity, equal_nan=True)
    ids = np.array([3, 0, 3, 45])
    alone = Documents.of_texts([documents.table.texts[i] for i in ids.tolist()])
    shingles, offsets = shingles_of_words(*alone.words(), 3)
    assert np.array_equal(
        documents.table.signatures(ids, nd.signing(64, 3)), minhash(shingles, offsets, nd.permutations(64))
    )


def test_the_decision_keeps_few_exact_shingle_sets_and_decides_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The exact sets (several kB a record) are kept for the most recently used records only; one
    evicted is made again from its text, so any bound gives the unbounded answer."""
    rng = random.Random(5)
    originals = [sentence(rng, 80) for _ in range(60)]
    texts = originals + [changed(rng.choice(originals), rng, rng.randint(1, 5)) for _ in range(120)]
    rng.shuffle(texts)

    def search() -> nd.NearDuplicates:
        documents = Documents.of_texts(texts)
        return find_near_duplicates(
            documents, np.arange(len(texts)), threshold=0.85, num_perm=64, shingle_size=3
        )

    unbounded = search()
    monkeypatch.setattr(nd, "_RECENT_SETS", 1)
    bounded = search()
    assert (unbounded.duplicate_of >= 0).sum() >= 40
    assert np.array_equal(unbounded.duplicate_of, bounded.duplicate_of)
    assert np.array_equal(unbounded.similarity, bounded.similarity, equal_nan=True)
    sets = nd._ShingleSets(Documents.of_texts(texts), 3, limit=2)
    for index in (0, 1, 0, 2, 1):
        assert sets(index) == word_shingles(texts[index], 3)
    assert list(sets._sets) == [2, 1]  # 0, the least recently used, went first


def test_records_left_out_by_a_mask_are_as_if_they_were_not_there() -> None:
    """The searches take the records an earlier rule left (a mask, with the fingerprints the blocks
    made) and answer as they do on a copy of those records alone."""
    rng = random.Random(11)
    originals = [sentence(rng, 50) for _ in range(50)]
    texts = originals + [changed(rng.choice(originals), rng, rng.randint(0, 4)) for _ in range(150)]
    rng.shuffle(texts)
    documents = Documents.of_texts(texts).fingerprinted(nd.signing(64, 3))
    rank = np.random.default_rng(2).permutation(len(texts))
    eligible = np.ones(len(texts), dtype=bool)
    eligible[rng.sample(range(len(texts)), 60)] = False
    among = np.flatnonzero(eligible)
    alone = Documents.of_texts([texts[i] for i in among.tolist()])  # a copy without fingerprints

    exact = find_exact_duplicates(documents, rank, eligible=eligible)
    expected = find_exact_duplicates(alone, rank[among])
    assert (exact[~eligible] == -1).all() and np.isin(exact[exact >= 0], among).all()
    assert np.array_equal(exact[among], np.where(expected >= 0, among[expected], -1))
    assert (expected >= 0).sum() >= 5  # unchanged copies: there are exact duplicates to find

    near = find_near_duplicates(
        documents, rank, threshold=0.85, num_perm=64, shingle_size=3, eligible=eligible
    )
    copy = find_near_duplicates(alone, rank[among], threshold=0.85, num_perm=64, shingle_size=3)
    assert (near.duplicate_of[~eligible] == -1).all()
    assert np.array_equal(
        near.duplicate_of[among], np.where(copy.duplicate_of >= 0, among[copy.duplicate_of], -1)
    )
    assert np.array_equal(near.similarity[among], copy.similarity, equal_nan=True)
    assert (copy.duplicate_of >= 0).sum() >= 20


def test_band_keys_are_made_a_band_at_a_time_as_the_search_asks() -> None:
    """BandKeys makes a band's keys when the search asks for them, holding three bands at most; the
    search's pieces (a band's pairs each) are, together, candidate_pairs."""
    rng = np.random.default_rng(4)
    n = 3000
    signatures = rng.integers(0, 6, size=(n, 64), dtype=np.uint32)  # few values: crowded buckets
    banding = banding_for(64, 0.85)
    lazy = nd.BandKeys(signatures, banding)
    keys = nd.band_keys(signatures, banding)
    for band in [0, 1, 2, 11, 0]:
        np.testing.assert_array_equal(lazy[band], keys[band])
    assert len(lazy._made) <= 3
    rank = rng.permutation(n)
    eligible = rng.random(n) > 0.1
    later, earlier = candidate_pairs(keys, rank, eligible)
    assert len(later) > 1000
    pieces = list(nd.candidate_pieces(nd.BandKeys(signatures, banding), rank, eligible))
    assert len(pieces) == banding.bands
    for mine, theirs in zip(nd.pairs_of(pieces, n), (later, earlier), strict=True):
        np.testing.assert_array_equal(mine, theirs)


@pytest.mark.parametrize("num_perm", [32, 64, 128])
def test_signatures_on_disk_decide_as_in_memory(num_perm: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch's signatures wait on disk (SignatureStore, appended a block at a time): the search
    reads them a few values of every record at a time and decides exactly as with them in memory, the
    agreement filter's stages included (one stage at 32 values, groups of 8 after the first 16 above,
    the second on a few hundred pairs at a time), and so with the pairs' shingles made a few pairs at a
    time. The blocks' normalised texts wait on disk too (packed by each block, pickled back, moved
    to the batch's TextStore), and the exact duplicates are those found with them in memory."""
    rng = random.Random(num_perm)
    template = sentence(rng, 30)  # a shared part: pairs that agree on some values and fail the filter
    originals = [f"{template} {sentence(rng, 20)}" for _ in range(80)]
    texts = originals + [changed(rng.choice(originals), rng, rng.randint(0, 6)) for _ in range(220)]
    rng.shuffle(texts)
    documents = Documents.of_texts(texts).fingerprinted(nd.signing(num_perm, 3))
    fingerprints = documents.fingerprints
    assert fingerprints is not None and isinstance(fingerprints.signatures, np.ndarray)
    store = SignatureStore(num_perm)
    batch_texts = TextStore.on_disk()
    blocks = []
    for start in range(0, len(texts), 70):
        block = documents.subset(np.arange(start, min(start + 70, len(texts))))
        assert block.fingerprints is not None
        store.append(block.fingerprints.signatures)
        packed = replace(block.packed(), fingerprints=block.fingerprints.without_signatures())
        blocks.append(pickle.loads(pickle.dumps(packed)).moved(batch_texts))
    on_disk = Documents.concat(blocks, store)
    assert isinstance(on_disk.table.texts, StoredTexts)
    assert on_disk.texts(np.arange(len(texts))) == texts
    rank = np.random.default_rng(1).permutation(len(texts))
    np.testing.assert_array_equal(
        find_exact_duplicates(on_disk, rank), find_exact_duplicates(documents, rank)
    )
    assert (find_exact_duplicates(on_disk, rank) >= 0).any()
    theirs = find_near_duplicates(documents, rank, threshold=0.85, num_perm=num_perm, shingle_size=3)
    monkeypatch.setattr(nd, "_SECOND_STAGE_PAIRS", 300)
    monkeypatch.setattr(nd, "_PAIRS_AT_ONCE", 50)
    monkeypatch.setattr(nd, "_SHINGLE_PAIRS", 7)  # the pairs' shingles made a few pairs at a time
    mine = find_near_duplicates(on_disk, rank, threshold=0.85, num_perm=num_perm, shingle_size=3)
    np.testing.assert_array_equal(mine.duplicate_of, theirs.duplicate_of)
    np.testing.assert_array_equal(mine.similarity, theirs.similarity)
    assert (mine.candidates, mine.compared, mine.confirmed) == (
        theirs.candidates,
        theirs.compared,
        theirs.confirmed,
    )
    assert 0 < mine.compared < mine.candidates  # the filter dropped pairs, and let some through
    assert (mine.duplicate_of >= 0).sum() >= 50
    store.close()
    batch_texts.close()


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_the_first_stage_cuts_values_to_16_bits_and_the_second_decides_on_whole_values(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)
    num_perm = 64
    threshold = 0.95
    cutoff = nd.min_agreement(num_perm, threshold, nd.PREFILTER_MISS * 9 / 10)
    base = rng.integers(0, 2**32, size=num_perm, dtype=np.uint32)
    high_bit = np.uint32(0x10000)  # a value that differs only above its low 16 bits
    twin_in_low_bits = base ^ high_bit
    near = base.copy()
    near[rng.choice(num_perm, 4, replace=False)] += np.uint32(1)  # 60 of 64 values agree
    far = rng.integers(0, 2**32, size=num_perm, dtype=np.uint32)
    # All 16 first values agree in their low bits: in the first stage's count, both reach 64. Whole,
    # one agrees on `cutoff` values (near), the other on one fewer (not near).
    at_cutoff, below_cutoff = base.copy(), base.copy()
    at_cutoff[: num_perm - cutoff] ^= high_bit
    below_cutoff[: num_perm - cutoff + 1] ^= high_bit
    signatures = np.stack([base, twin_in_low_bits, near, far, at_cutoff, below_cutoff])
    store = SignatureStore(num_perm)
    store.append(signatures)
    monkeypatch.setattr(nd, "_SECOND_STAGE_PAIRS", 1)  # each piece decided as it comes
    agreeing = nd.AgreementFilter(signatures if where == "memory" else store, threshold=threshold)
    assert agreeing.cutoff == cutoff and num_perm - cutoff + 1 <= nd._FIRST_STAGE
    assert agreeing.leading.dtype == np.uint16 and agreeing.leading.shape == (6, nd._FIRST_STAGE)
    n = len(signatures)
    codes = np.array([later * n + 0 for later in range(1, n)], dtype=np.int64)
    first = nd.agreement(agreeing.leading, codes // n, codes % n)
    assert first[[0, 3, 4]].tolist() == [nd._FIRST_STAGE] * 3  # the low bits alone agree
    assert first[2] < agreeing.quick  # an unrelated record does not pass the first stage
    agreeing.add(codes)
    later, earlier = agreeing.pairs()
    # The twin agrees on no whole value; the record one value short of the cutoff is not near.
    assert later.tolist() == [2, 4] and earlier.tolist() == [0, 0]
    store.close()


def test_the_decision_is_exact_around_the_threshold() -> None:
    rng = random.Random(7)
    original = sentence(rng, 60)
    variants = [changed(original, rng, edits) for edits in (1, 2, 3, 4, 5, 6)]
    values = [jaccard(word_shingles(original, 3), word_shingles(v, 3)) for v in variants]
    # Threshold between two variants' exact similarity: one just above it, one just below.
    ordered = sorted(values, reverse=True)
    threshold = (ordered[2] + ordered[3]) / 2
    texts = [original, *variants]
    found = find_near_duplicates(
        Documents.of_texts(texts), np.arange(len(texts)), threshold=threshold, num_perm=64, shingle_size=3
    )
    for index, value in enumerate(values, start=1):
        similar_to_kept_variant = any(
            found.duplicate_of[k] < 0
            and jaccard(word_shingles(texts[index], 3), word_shingles(texts[k], 3)) >= threshold
            for k in range(1, index)
        )
        assert (found.duplicate_of[index] >= 0) == (value >= threshold or similar_to_kept_variant)


def test_a_near_duplicate_of_a_near_duplicate_is_kept_unless_near_the_kept_one() -> None:
    rng = random.Random(3)
    a = sentence(rng, 40)
    b = changed(a, rng, 1)
    # c is near b but not near a: b is not kept, so c stays.
    words = b.split()
    c = None
    for attempt in range(200):
        candidate = changed(b, random.Random(attempt), 2)
        sa, sb, sc = (word_shingles(t, 3) for t in (a, b, candidate))
        if jaccard(sc, sb) >= 0.85 > jaccard(sc, sa):
            c = candidate
            break
    assert c is not None and words
    found = find_near_duplicates(
        Documents.of_texts([a, b, c]), np.arange(3), threshold=0.85, num_perm=64, shingle_size=3
    )
    assert list(found.duplicate_of) == [-1, 0, -1]


def test_rank_decides_which_record_is_kept() -> None:
    rng = random.Random(5)
    a = sentence(rng, 40)
    b = changed(a, rng, 1)
    found = find_near_duplicates(
        Documents.of_texts([a, b]), np.array([1, 0]), threshold=0.85, num_perm=64, shingle_size=3
    )
    assert list(found.duplicate_of) == [1, -1]


def test_matches_are_exact_equal_or_most_similar_reference() -> None:
    rng = random.Random(11)
    references = [sentence(rng, 60) for _ in range(20)]
    near = changed(references[4], rng, 1)  # at most 3 of 58 shingles differ: Jaccard >= 55/61
    far = changed(references[9], rng, 8)
    table = TextTable()
    queries = [references[3], near, far, "", sentence(rng, 60)]
    matches = find_matches(
        Documents.of_texts(queries, table),
        Documents.of_texts(references, table),
        threshold=0.85,
        shingle_size=3,
    )
    assert list(matches.reference) == [3, 4, -1, -1, -1]
    assert matches.similarity[0] == 1.0
    assert matches.similarity[1] == jaccard(word_shingles(near, 3), word_shingles(references[4], 3))


def test_matches_equal_the_definition_on_many_queries() -> None:
    rng = random.Random(13)
    references = [sentence(rng, 25) for _ in range(30)]
    queries = [changed(rng.choice(references), rng, rng.randint(0, 6)) for _ in range(300)]
    table = TextTable()
    matches = find_matches(
        Documents.of_texts(queries, table),
        Documents.of_texts(references, table),
        threshold=0.8,
        shingle_size=3,
    )
    reference_sets = [word_shingles(r, 3) for r in references]
    for q, query in enumerate(queries):
        values = [jaccard(word_shingles(query, 3), s) for s in reference_sets]
        best = max(range(len(values)), key=lambda r: (values[r], -r))
        assert matches.reference[q] == (best if values[best] >= 0.8 else -1)


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_sketches_from_parts_equal_minhash_of_the_whole_record(size: int) -> None:
    rng = random.Random(size)
    table = TextTable()
    shared = [sentence(rng, 12), "user", "assistant", "a", sentence(rng, 2)]
    records = []
    for _ in range(300):
        parts = [
            rng.choice(shared) if rng.random() < 0.6 else sentence(rng, rng.randint(1, 9))
            for _ in range(rng.randint(0, 7))
        ]
        records.append(parts)
    documents = Documents.build(table, records)
    signatures, word_counts = sketches(documents, nd.signing(32, size))
    words, offsets = documents.words()
    assert (word_counts == np.diff(offsets)).all()
    assert (signatures == minhash(*shingles_of_words(words, offsets, size), nd.permutations(32))).all()


def test_matches_of_queries_made_of_several_parts_equal_the_definition() -> None:
    rng = random.Random(17)
    references = [sentence(rng, 25) for _ in range(20)]
    table = TextTable()
    records = []
    for _ in range(200):
        words = changed(rng.choice(references), rng, rng.randint(0, 5)).split()
        cut = rng.randint(0, len(words))
        records.append([" ".join(words[:cut]), " ".join(words[cut:])])  # one text in two parts
    records.append(["", ""])
    matches = find_matches(
        Documents.build(table, records),
        Documents.of_texts(references, table),
        threshold=0.8,
        shingle_size=3,
    )
    reference_sets = [word_shingles(r, 3) for r in references]
    for q, parts in enumerate(records):
        query = word_shingles(" ".join(p for p in parts if p), 3)
        values = [jaccard(query, s) if query else 0.0 for s in reference_sets]
        best = max(range(len(values)), key=lambda r: (values[r], -r))
        assert matches.reference[q] == (best if values[best] >= 0.8 else -1)


def test_matches_are_decided_once_per_distinct_query_text() -> None:
    rng = random.Random(19)
    references = [sentence(rng, 60) for _ in range(10)]
    near = changed(references[2], rng, 1)
    far = sentence(rng, 60)
    table = TextTable()
    queries = [near, far, "", near, references[5], far, near, "a b"]
    matches = find_matches(
        Documents.of_texts(queries, table),
        Documents.of_texts(references, table),
        threshold=0.85,
        shingle_size=3,
    )
    assert list(matches.reference) == [2, -1, -1, 2, 5, -1, 2, -1]
    assert matches.similarity[0] == matches.similarity[3] == matches.similarity[6] < 1.0
    assert matches.similarity[4] == 1.0
    assert matches.candidates == 3  # the three copies of the near-duplicate were compared


BLOCK_IN_A_FRESH_PROCESS = """
import pickle, sys
from pathlib import Path
from tuneline.engines import blocks
from tuneline.tasks import ingest

path, arguments = Path(sys.argv[1]), pickle.loads(Path(sys.argv[2]).read_bytes())
screened = blocks.screen_block([ingest.jsonl_file(str(path), "s")], *arguments)
print(len(screened.frame), "datasketch" in sys.modules, "scipy.stats" in sys.modules)
Path(sys.argv[3]).write_bytes(pickle.dumps(screened.documents))
"""


def test_a_block_task_signs_its_records_without_importing_the_signing_libraries(tmp_path: Path) -> None:
    # datasketch and scipy.stats cost about 1.8 s and tens of MB in every worker and Ray worker: the
    # flow makes the block's arguments (the permutations among them) and hands them over, as the
    # engines do.
    config = load_config()
    evals = [json.loads(line) for line in Path(config.data.eval_set).read_text().splitlines()]
    path, arguments, signed = tmp_path / "block.jsonl", tmp_path / "arguments.pickle", tmp_path / "out"
    path.write_text("".join(synthetic_chat_lines(200, seed=0)))
    arguments.write_bytes(pickle.dumps((evals, *blocks.block_arguments(config))))
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_IN_A_FRESH_PROCESS, str(path), str(arguments), str(signed)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["200", "False", "False"]
    documents = pickle.loads(signed.read_bytes())
    fingerprints = documents.fingerprints
    assert 150 < len(documents) <= 200  # the records kept after rule 1
    assert not documents.table.has_words()  # their words did not travel
    # What the block made is what the batch would make of the same records.
    made_here = Fingerprints.of(
        Documents(documents.table, documents.parts, documents.offsets),
        nd.signing(config.dedupe.num_perm, config.dedupe.shingle_size),
    )
    assert np.array_equal(fingerprints.signatures, made_here.signatures)
    assert np.array_equal(fingerprints.content, made_here.content)
    assert np.array_equal(fingerprints.word_counts, made_here.word_counts)
    assert nd.min_agreement(128, 0.8) > 0 and len(nd.permutations(128)[0]) == 128  # imported on use
