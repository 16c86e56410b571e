"""Duplicate search over normalised texts: exact duplicates by hashing, near-duplicates by MinHash LSH
with an exact Jaccard decision, and exact matching against a small reference set (an eval set).

Records are `Documents`: each is the space-joined sequence of some distinct normalised texts (its
parts: a role, a message text, ...), held once in a `TextTable` (in memory, or, for a batch the
engines put together, in its TextStore on disk: tuneline/text_store.py's StoredTexts, read back for
the records compared). The system prompt and templated
replies recur in most records, so each distinct text is split into words and hashed once, and a
record's words are gathered from its parts with numpy instead of being split again in Python.

Near-duplicates, in four steps, each linear in the records:
1. MinHash signatures, datasketch's (scheme "affine32": 32-bit shingle hashes pre-mixed with the
   MurmurHash3 finalizer, then `a * h + b mod 2^32` with datasketch's own permutation parameters),
   computed with numpy for a batch at once instead of one `MinHash.update` per shingle, and once per
   distinct text of a batch of records for the shingles inside it (`sketches`); tests hold them equal
   to datasketch's bit for bit;
2. LSH banding with sorted arrays (datasketch's MinHashLSH inserts one key at a time in Python, too
   slow for a million records), bounded per record (`candidate_pairs`);
3. a signature-agreement filter, applied to each band's pairs as they are found (`AgreementFilter`:
   only the pairs that pass are held, not the candidate pairs of all bands), then the Jaccard of the
   32-bit hashed shingle sets of the pairs that pass, all pairs at once (a merge by sort);
4. a decision in rank order on the exact Jaccard of the words themselves.

Guarantees: no false positives (a near-duplicate is reported only after the exact Jaccard of the two
records' word shingles, recomputed from their text, is at or above the threshold; an exact duplicate
only after the two normalised texts compared equal). A pair at the threshold becomes a candidate with
probability at least `RECALL` (the banding is chosen for that), unless its bucket is crowded, and
passes the agreement filter with probability at least 1 - `PREFILTER_MISS`; more similar pairs more
surely. Matching against references is exact: no sketch, no probability.

Matching against references takes each distinct query text once, with the shingles the table already
holds, and sorts only the few texts that pass two exact filters. rensa (a Rust MinHash) was measured
against `minhash` here: its digest is 4x faster, but its digests reach numpy only through Python lists,
which makes it slower end to end, and its signatures are not datasketch's.

The module holds one search (exact, near, against references) over one shared TextTable, whose
per-text caches all three use; hence its length.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tuneline.heap import release_free_memory
from tuneline.normalize import jaccard, word_shingles
from tuneline.signature_store import SignatureStore
from tuneline.text_store import StoredTexts, TextStore, take
from tuneline.threads import mapped, prefetched

# The records' signatures: in memory, or in the batch's store on disk (tuneline/signature_store.py).
Signatures = np.ndarray | SignatureStore

# datasketch's default seed: the permutation parameters are MinHash(num_perm, seed=1).permutations.
PERMUTATION_SEED = 1
# A pair exactly at the threshold shares at least one band with this probability.
RECALL = 0.995
# The chance that a pair exactly at the threshold is dropped by the signature-agreement filter (its
# two stages together). Pairs that share a template but no more (Jaccard ~0.65) multiply with the
# data; this filter is what keeps their exact comparison from dominating.
PREFILTER_MISS = 1e-2
# The filter's first stage reads only this many signature values per record (one cache line).
_FIRST_STAGE = 16
# Pairs that passed the first stage decided by the second at once, when the signatures are on disk:
# each time, every record's signature is read, _SECOND_STAGE_GROUP values of every record at a time
# (32 bytes a record held beside the first stage's 32: the group's size changes no decision).
_SECOND_STAGE_PAIRS = 1 << 22
_SECOND_STAGE_GROUP = 8
# Pairs whose agreement on a group of values is counted at once (bounds the second stage's temporaries).
_PAIRS_AT_ONCE = 1 << 20
# Within a band bucket, each record is paired with the head of its run and this many predecessors (see
# candidate_pairs). 1 finds 99.65% of the near-duplicates that 12 (and two heads) find in 300,000
# synthetic chats, with a third of the candidate pairs.
NEIGHBOURS = 1
# Pairs whose records' hashed shingles are made at once (_hashed_jaccard): at most twice as many
# records, a few hundred bytes each.
_SHINGLE_PAIRS = 1 << 20
# Exact shingle sets kept for the near-duplicate decision: a record and its recent partners; one
# evicted is computed again from its text if asked for.
_RECENT_SETS = 1 << 12
# Pairs of the decision whose records' texts are read from the store with one call (at most twice as
# many records: a quarter of _RECENT_SETS, so none is let go before its pairs are decided).
_READ_AHEAD_PAIRS = _RECENT_SETS // 8
# Records per batch when words and shingles are materialised (bounds the memory of those arrays).
BATCH = 1 << 14
# Shingles per block of the MinHash computation: the permuted block (4 bytes each) stays in cache.
_BLOCK = 1 << 16

_U64 = np.uint64
_MIX_1 = _U64(0xBF58476D1CE4E5B9)
_MIX_2 = _U64(0x94D049BB133111EB)
_PRIME_64 = _U64(0x100000001B3)  # FNV-1a 64-bit prime
_GOLDEN = _U64(0x9E3779B97F4A7C15)


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place on a uint64 array (wrapping arithmetic is intended)."""
    h ^= h >> _U64(30)
    h *= _MIX_1
    h ^= h >> _U64(27)
    h *= _MIX_2
    h ^= h >> _U64(31)
    return h


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of arange(start, start + length) for each pair, as one int64 array."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    return np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lengths), lengths) + np.arange(
        int(ends[-1]) if len(ends) else 0, dtype=np.int64
    )


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy's hash-based unique is several times slower on large int arrays)."""
    values = np.sort(values)
    if len(values) < 2:
        return values
    keep = np.empty(len(values), dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def _word_hash(word: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
    )


class TextTable:
    """Distinct normalised texts, each with an id; the stable 64-bit hashes of their words (the same in
    every process and run: blake2b of each distinct word), and per text, the hashes of the shingles that
    lie wholly inside it. Computed on demand, once per text, as texts are added (or, for some texts
    only, without keeping them: `words_of`); the MinHash of those shingles is computed for the texts
    asked for and not kept (`signatures`)."""

    def __init__(self) -> None:
        # The texts in memory, or kept in a TextStore (a batch's: `stored`), which only looks them up.
        self.texts: list[str] | StoredTexts = []
        # text -> id, for `intern`; None until a text is interned again (`drop_index`, unpickling):
        # about 55 bytes a text, which a table that only looks its texts up by id does without.
        self._ids: dict[str, int] | None = {}
        self._word_hash: dict[str, int] = {}
        self._words = _Growing(np.uint64)
        self._hashes = _Growing(np.uint64)
        self._inner: dict[int, _Growing] = {}

    def __len__(self) -> int:
        return len(self.texts)

    def __getstate__(self) -> dict[str, object]:
        """What a table sent to another process carries: its texts. The rest is computed again there
        if it is needed (the id of each text, word and shingle hashes): a block's records come back
        with their Fingerprints, and the batch needs the words of only the few records the
        near-duplicate decision compares (`Documents.words`), about 0.36 kB a record less to hold."""
        return {"texts": self.texts}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__()  # type: ignore[misc]
        self.texts = state["texts"]  # type: ignore[assignment]
        self.drop_index()  # built again only if a text is interned here

    @classmethod
    def stored(cls, texts: StoredTexts) -> TextTable:
        """A table of texts kept in a TextStore: read back when asked for, never interned into."""
        table = cls()
        table.texts = texts
        table.drop_index()
        return table

    def intern(self, normalized: str) -> int:
        """The id of a normalised text (single spaces between words, none at the ends)."""
        assert isinstance(self.texts, list), "texts kept in a store are looked up, not interned"
        ids = self._ids
        if ids is None:
            ids = self._ids = {text: index for index, text in enumerate(self.texts)}
        found = ids.get(normalized)
        if found is None:
            found = ids[normalized] = len(self.texts)
            self.texts.append(normalized)
        return found

    def drop_index(self) -> None:
        """Let the text -> id index go; `intern` builds it again if it is ever called."""
        self._ids = None

    def words(self) -> tuple[np.ndarray, np.ndarray]:
        """(word hashes of all texts, flat uint64; offsets, int64, len(self) + 1)."""
        while self._words.count < len(self.texts):
            start = self._words.count
            self._words.add(*self._split(self.texts[start : start + BATCH]))
        return self._words.values()

    def has_words(self) -> bool:
        """Whether the word hashes of every text are kept (`words` made them)."""
        return self._words.count == len(self.texts)

    def words_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(word hashes of the texts `ids`, flat; their offsets), made for them without keeping them
        (only the hash of each distinct word is kept)."""
        values: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        texts = self.texts
        for start in range(0, len(ids), BATCH):
            hashes, counts = self._split(take(texts, ids[start : start + BATCH]))
            values.append(hashes)
            lengths.append(counts)
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        if lengths:
            np.cumsum(np.concatenate(lengths), out=offsets[1:])
        return (np.concatenate(values) if values else np.zeros(0, dtype=np.uint64)), offsets

    def _split(self, chunk: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(the word hashes of the texts `chunk`, flat; each one's word count)."""
        split = pc.split_pattern(pa.array(chunk, type=pa.large_string()), " ")
        lengths = pc.list_value_length(split).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = split.flatten()
        empty = [k for k, text in enumerate(chunk) if not text]
        if empty:  # "" splits into one empty word; an empty text has none
            keep = np.ones(len(flat), dtype=bool)
            keep[(np.cumsum(lengths) - lengths)[empty]] = False
            flat = flat.filter(pa.array(keep))
            lengths[empty] = 0
        encoded = pc.dictionary_encode(flat)
        known = self._word_hash
        distinct = encoded.dictionary.to_pylist()
        for word in distinct:
            if word not in known:
                known[word] = _word_hash(word)
        table = np.fromiter((known[w] for w in distinct), dtype=np.uint64, count=len(distinct))
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        return (table[codes] if len(codes) else np.zeros(0, dtype=np.uint64)), lengths

    def hashes(self) -> tuple[np.ndarray, np.ndarray]:
        """(the polynomial hash of each text's word sequence, see content_hashes; its word count)."""
        word_hash, offsets = self.words()
        while self._hashes.count < len(self.texts):
            start, stop = self._hashes.count, min(self._hashes.count + BATCH, len(self.texts))
            words = word_hash[offsets[start] : offsets[stop]]
            local = offsets[start : stop + 1] - offsets[start]
            lengths = np.diff(local)
            owner = np.repeat(np.arange(len(lengths)), lengths)
            after = (local[1:][owner] - 1) - np.arange(len(words), dtype=np.int64)
            powers = _powers(int(lengths.max(initial=0)) + 1)
            self._hashes.add(
                _segment_sums(words * powers[after], local), np.ones(stop - start, dtype=np.int64)
            )
        return self._hashes.values()[0], np.diff(offsets)

    def inner_shingles(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(64-bit hashes of the shingles wholly inside each text: runs of `size` words, none for a
        text shorter than that; offsets)."""
        inner = self._inner.setdefault(size, _Growing(np.uint64))
        while inner.count < len(self.texts):
            start = inner.count
            inner.add(*self._shingles_inside(np.arange(start, min(start + BATCH, len(self.texts))), size))
        return inner.values()

    def _shingles_inside(self, ids: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """inner_shingles of the texts `ids`: the hashes, and how many each text has."""
        word_hash, offsets = self.words()
        lengths = offsets[ids + 1] - offsets[ids]
        local = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=local[1:])
        windows = np.maximum(lengths - size + 1, 0)
        first = _ranges(local[:-1], windows)
        words = word_hash[_ranges(offsets[ids], lengths)]
        return _combine(words, first, np.full(len(first), size), size), windows

    def forget_caches(self) -> None:
        """Drop what a step made on the way that the next does not need: the per-text shingle hashes
        (inner_shingles, which matching against references fills) and the hash of each distinct word
        seen (a few hundred MB for the words of a million records). Both are made again if asked for."""
        self._inner.clear()
        self._word_hash = {}

    def signatures(self, ids: np.ndarray, signing: Signing) -> np.ndarray:
        """The MinHash of the inner shingles of each text of `ids`, shape (len(ids), signing.num_perm);
        all 2**32 - 1 for a text without any. Made a batch of texts at a time and not kept: a million
        records' texts take about 0.25 GB of signatures, and `sketches` needs those of one batch of
        records at a time."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), signing.num_perm), dtype=np.uint32)
        # Matching against references (a block's leakage check) made the inner shingles of every text
        # already: taken from there, not made again.
        kept = self._inner.get(signing.shingle_size)
        made = kept.values() if kept is not None and kept.count == len(self.texts) else None
        for start in range(0, len(ids), BATCH):
            if made is None:
                shingles, counts = self._shingles_inside(ids[start : start + BATCH], signing.shingle_size)
            else:
                batch = ids[start : start + BATCH]
                counts = made[1][batch + 1] - made[1][batch]
                shingles = made[0][_ranges(made[1][batch], counts)]
            local = np.zeros(len(counts) + 1, dtype=np.int64)
            np.cumsum(counts, out=local[1:])
            out[start : start + len(counts)] = minhash(shingles, local, signing.permutation)
        return out


class _Growing:
    """Per-text arrays of a TextTable, appended a chunk of texts at a time: values and offsets."""

    def __init__(self, dtype: type) -> None:
        self.dtype = dtype
        self.count = 0
        self._values: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []
        self._joined: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, values: np.ndarray, lengths: np.ndarray) -> None:
        self._values.append(values)
        self._lengths.append(lengths)
        self.count += len(lengths)
        self._joined = None

    def values(self) -> tuple[np.ndarray, np.ndarray]:
        if self._joined is None:
            values = np.concatenate(self._values) if self._values else np.zeros(0, dtype=self.dtype)
            lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int64)
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            self._values, self._lengths = [values], [lengths]
            self._joined = (values, offsets)
        return self._joined


@dataclass(frozen=True)
class Documents:
    """Records as sequences of texts of a TextTable: record i is the space-joined texts
    table.texts[parts[offsets[i]:offsets[i + 1]]]. Parts are never empty texts. `fingerprints`, when
    set (`fingerprinted`), are the records' hashes and signatures, made where the records were
    screened and carried along by `subset` and `concat`; the duplicate searches make them when not."""

    table: TextTable
    parts: np.ndarray  # text ids (int64; int32 in a batch put together while they fit: `concat`)
    offsets: np.ndarray  # int64, len(self) + 1
    fingerprints: Fingerprints | None = None

    @classmethod
    def build(cls, table: TextTable, records: Iterable[Sequence[str]]) -> Documents:
        """Documents from normalised texts per record (empty texts are left out)."""
        parts: list[int] = []
        offsets = [0]
        intern = table.intern
        for texts in records:
            parts.extend(intern(t) for t in texts if t)
            offsets.append(len(parts))
        return cls(table, np.asarray(parts, dtype=np.int64), np.asarray(offsets, dtype=np.int64))

    @classmethod
    def of_texts(cls, texts: Sequence[str], table: TextTable | None = None) -> Documents:
        """One document per normalised text."""
        return cls.build(table or TextTable(), ([t] for t in texts))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def text(self, index: int) -> str:
        """The normalised text of one record."""
        return " ".join(take(self.table.texts, self.parts[self.offsets[index] : self.offsets[index + 1]]))

    def texts(self, indices: np.ndarray) -> list[str]:
        """The normalised texts of the records `indices`, in that order (their parts read at once)."""
        indices = np.asarray(indices, dtype=np.int64)
        counts = self.offsets[indices + 1] - self.offsets[indices]
        parts = take(self.table.texts, self.parts[_ranges(self.offsets[indices], counts)])
        found: list[str] = []
        at = 0
        for count in counts.tolist():
            found.append(" ".join(parts[at : at + count]))
            at += count
        return found

    def packed(self) -> Documents:
        """These records over a table of the texts they use alone, packed into one byte string
        (StoredTexts.packed): what a block's task sends back."""
        used, inverse = np.unique(self.parts, return_inverse=True)
        texts = StoredTexts.packed(take(self.table.texts, used))
        return Documents(TextTable.stored(texts), inverse.reshape(-1), self.offsets, self.fingerprints)

    def moved(self, into: TextStore) -> Documents:
        """These records (packed) with their texts appended to `into`, a batch's store on disk."""
        texts = self.table.texts
        assert isinstance(texts, StoredTexts), "only packed texts are moved"
        return Documents(TextTable.stored(texts.moved(into)), self.parts, self.offsets, self.fingerprints)

    def spilled(self, directory: str) -> Documents:
        """These records (packed) with their texts in a file of `directory` (TextStore.spilled)."""
        texts = self.table.texts
        assert isinstance(texts, StoredTexts), "only packed texts are spilled"
        return Documents(
            TextTable.stored(texts.spilled(directory)), self.parts, self.offsets, self.fingerprints
        )

    def subset(self, indices: np.ndarray) -> Documents:
        """The records at `indices`, in that order (with their fingerprints, if set)."""
        indices = np.asarray(indices, dtype=np.int64)
        counts = self.offsets[indices + 1] - self.offsets[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        fingerprints = self.fingerprints.subset(indices) if self.fingerprints is not None else None
        return Documents(
            self.table, self.parts[_ranges(self.offsets[indices], counts)], offsets, fingerprints
        )

    def fingerprinted(self, signing: Signing) -> Documents:
        """These records with their fingerprints made (Fingerprints.of)."""
        return Documents(self.table, self.parts, self.offsets, Fingerprints.of(self, signing))

    @classmethod
    def concat(cls, parts: Sequence[Documents], signatures: SignatureStore | None = None) -> Documents:
        """The records of several Documents, in order, over one new table: the texts their records
        use, each part's once (a text in several parts is in the table once for each: a few templated
        texts a block, against an index of every text while the table is made, about 55 bytes a text),
        with their fingerprints if every part has them: what a block's task made is not redone where
        the blocks are put together. `signatures`: where the parts' signatures were moved already
        (Fingerprints.concat). Parts whose texts are all kept in one store (`moved`) give a table kept
        there too."""
        parts_ids: list[np.ndarray] = []
        offsets: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        in_memory: list[str] = []
        stored: list[StoredTexts] = []
        count = total = 0
        for part in parts:
            used, inverse = np.unique(part.parts, return_inverse=True)
            texts = part.table.texts
            ids = count + inverse.reshape(-1)
            # 32-bit ids while the table's texts fit them (a batch's parts: several a record).
            parts_ids.append(ids.astype(np.int32) if count + len(used) < 2**31 else ids)
            if isinstance(texts, StoredTexts):
                stored.append(texts.subset(used))
            else:
                in_memory.extend(texts[i] for i in used.tolist())
            count += len(used)
            offsets.append(part.offsets[1:] + total)
            total += len(part.parts)
        assert not (stored and in_memory), "some parts' texts are stored and others not"
        if stored:
            table = TextTable.stored(StoredTexts.concat(stored))
        else:
            table = TextTable()
            table.texts = in_memory
            table.drop_index()  # a batch put together looks its texts up by id only
        made = [part.fingerprints for part in parts if part.fingerprints is not None]
        return cls(
            table,
            np.concatenate(parts_ids) if parts_ids else np.zeros(0, dtype=np.int64),
            np.concatenate(offsets),
            Fingerprints.concat(made, signatures) if made and len(made) == len(parts) else None,
        )

    def words(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(word hashes of records start..stop, flat; their offsets, from 0). From the words the
        table keeps, or, if it keeps none, from those of these records' texts, made now and let go."""
        stop = len(self) if stop is None else stop
        parts = self.parts[self.offsets[start] : self.offsets[stop]]
        if self.table.has_words():
            word_hash, text_offsets = self.table.words()
        else:
            used, parts = np.unique(parts, return_inverse=True)
            parts = parts.reshape(-1)
            word_hash, text_offsets = self.table.words_of(used)
        part_lengths = np.diff(text_offsets)[parts]
        cumulative = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum(part_lengths, out=cumulative[1:])
        offsets = cumulative[self.offsets[start : stop + 1] - self.offsets[start]]
        if not len(parts):
            return np.zeros(0, dtype=np.uint64), offsets
        return word_hash[_ranges(text_offsets[parts], part_lengths)], offsets

    def batches(self) -> Iterable[tuple[int, int]]:
        for start in range(0, len(self), BATCH):
            yield start, min(start + BATCH, len(self))


# --------------------------------------------------------------------------------------------------
# Exact duplicates.


_BASE = _U64(0xD6E8FEB86659FD93)  # odd: the polynomial hash's base


def _powers(count: int) -> np.ndarray:
    """_BASE ** k (mod 2**64) for k in range(count)."""
    powers = np.full(max(count, 1), _BASE, dtype=np.uint64)
    powers[0] = 1
    return np.cumprod(powers, dtype=np.uint64)


def _segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The wrapping sum of each segment values[offsets[i]:offsets[i + 1]] (0 for an empty one)."""
    counts = np.diff(offsets)
    if not len(values):
        return np.zeros(len(counts), dtype=np.uint64)
    sums = np.add.reduceat(values, np.minimum(offsets[:-1], len(values) - 1))
    sums[counts == 0] = 0
    return sums


def content_hashes(documents: Documents) -> np.ndarray:
    """A 64-bit hash of each record's word sequence: equal normalised texts hash equal, however they
    are split into parts. It is the polynomial hash sum(word_i * BASE ** (words after i)), which a
    record gets from its parts' own hashes without touching their words again."""
    text_hash, text_lengths = documents.table.hashes()
    part_lengths = text_lengths[documents.parts]
    cumulative = np.zeros(len(part_lengths) + 1, dtype=np.int64)
    np.cumsum(part_lengths, out=cumulative[1:])
    record_lengths = np.diff(cumulative[documents.offsets])
    # The words that follow each part within its record.
    part_owner = np.repeat(np.arange(len(documents)), np.diff(documents.offsets))
    following = cumulative[documents.offsets[1:]][part_owner] - cumulative[1:]
    powers = _powers(int(record_lengths.max(initial=0)) + 1)
    sums = _segment_sums(text_hash[documents.parts] * powers[following], documents.offsets)
    sums ^= record_lengths.astype(np.uint64) * _GOLDEN
    return _mix64(sums)


def find_exact_duplicates(
    documents: Documents, rank: np.ndarray, eligible: np.ndarray | None = None
) -> np.ndarray:
    """For each record, the index of the first (lowest rank) record with the same normalised text, or
    -1 when it is that first record itself. Hash groups (content_hashes, from the records'
    fingerprints if set) are confirmed by comparing the texts. Only the `eligible` records (default:
    all) are looked at: the others are neither marked nor named."""
    n = len(documents)
    first = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return first
    fingerprints = documents.fingerprints
    keys = fingerprints.content if fingerprints is not None else content_hashes(documents)
    among = np.arange(n) if eligible is None else np.flatnonzero(eligible)
    order = among[np.lexsort((rank[among], keys[among]))]
    sorted_keys = keys[order]
    same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    if not len(same):
        return first
    # Members of hash groups of two or more, grouped by key, each group in rank order.
    members = _sorted_unique(np.concatenate([same, same + 1]))
    texts: dict[str, int] = {}
    member_texts: list[str] = []
    for position, index in enumerate(order[members].tolist()):
        if position % BATCH == 0:  # the next batch of members' texts, read at once where they are stored
            member_texts = documents.texts(order[members[position : position + BATCH]])
        if position and sorted_keys[members[position]] != sorted_keys[members[position - 1]]:
            texts = {}
        earliest = texts.setdefault(member_texts[position % BATCH], index)
        if earliest != index:
            first[index] = earliest
    return first


# --------------------------------------------------------------------------------------------------
# Shingles and MinHash.


@dataclass(frozen=True)
class Banding:
    """`bands` bands of `rows` signature values each: two records are candidates when a band agrees."""

    bands: int
    rows: int

    def candidate_probability(self, similarity: float) -> float:
        return float(1.0 - (1.0 - similarity**self.rows) ** self.bands)


@cache
def banding_for(num_perm: int, threshold: float, recall: float = RECALL) -> Banding:
    """The most selective banding (most rows per band) under which a pair of Jaccard `threshold` becomes
    a candidate with probability >= `recall`; its 50% point lies below the threshold."""
    for rows in range(num_perm, 0, -1):
        banding = Banding(num_perm // rows, rows)
        if banding.candidate_probability(threshold) >= recall:
            return banding
    return Banding(num_perm, 1)


@cache
def min_agreement(num_perm: int, threshold: float, miss: float = PREFILTER_MISS) -> int:
    """The number of equal signature values below which a pair of Jaccard >= threshold falls with
    probability < miss."""
    if threshold <= 0:
        return 0
    from scipy.stats import binom  # imported here: see permutations

    return int(binom.ppf(miss, num_perm, threshold))


@dataclass(frozen=True)
class Signing:
    """How records are signed: the MinHash of their word shingles of `shingle_size` words under
    datasketch's affine32 permutations (a, b). Made once by the process that decides (`signing`) and
    handed to the processes that sign, which so never import datasketch."""

    shingle_size: int
    permutation: tuple[np.ndarray, np.ndarray]

    @property
    def num_perm(self) -> int:
        return len(self.permutation[0])


def signing(num_perm: int, shingle_size: int) -> Signing:
    """The Signing of `num_perm` permutations over shingles of `shingle_size` words."""
    return Signing(shingle_size, permutations(num_perm))


@cache
def permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 permutation parameters (a, b) for `num_perm` permutations.

    datasketch (and scipy.stats, min_agreement's) are imported when first needed, by the process that
    signs: a block's task (the credential screen, leakage) never does, and the two cost about 1.8 s of
    start-up and tens of MB in every worker process and Ray worker that imports this module."""
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=PERMUTATION_SEED, scheme="affine32").permutations
    return np.asarray(a, dtype=np.uint32), np.asarray(b, dtype=np.uint32)


def _combine(words: np.ndarray, first: np.ndarray, length: np.ndarray, size: int) -> np.ndarray:
    """The 64-bit hash of each shingle: `length` (<= size) words of `words` from index `first`; a
    shingle shorter than `size` (a record shorter than that) is padded with zeros."""
    padded = np.append(words, _U64(0))  # the last index stands for "past the end of a short record"
    h = np.full(len(first), _GOLDEN, dtype=np.uint64)
    h ^= _U64(size)
    past_end = len(words)
    for j in range(size):
        index = first + j
        if j:
            index[length <= j] = past_end
        h ^= padded[index]
        h *= _PRIME_64
    return _mix64(h)


def shingles_of_words(words: np.ndarray, offsets: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the word shingles of each record (runs of `size` words; a shorter record is one
    shingle of all its words; an empty one has none), as `normalize.word_shingles` defines them; and
    the offsets of each record's shingles."""
    counts = np.diff(offsets)
    n_shingles = np.where(counts >= size, counts - size + 1, np.minimum(counts, 1))
    shingle_offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(n_shingles, out=shingle_offsets[1:])
    if not shingle_offsets[-1]:
        return np.zeros(0, dtype=np.uint64), shingle_offsets
    first = _ranges(offsets[:-1], n_shingles)
    return _combine(words, first, np.repeat(np.minimum(counts, size), n_shingles), size), shingle_offsets


def _fmix32(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (datasketch's pre-mix of the affine32 scheme), in place."""
    values ^= values >> np.uint32(16)
    values *= np.uint32(0x85EBCA6B)
    values ^= values >> np.uint32(13)
    values *= np.uint32(0xC2B2AE35)
    values ^= values >> np.uint32(16)
    return values


def minhash(
    shingles: np.ndarray, offsets: np.ndarray, permutation: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """The MinHash signature of each record, shape (records, num_perm), uint32: row i equals the
    hashvalues of datasketch's MinHash(num_perm, scheme="affine32", hashfunc=identity) updated with
    the record's 32-bit shingle hashes (the high half of the 64-bit ones), given its permutation
    parameters (`permutations(num_perm)`). A record without shingles gets the empty signature (all
    2**32 - 1)."""
    a, b = permutation
    num_perm = len(a)
    n = len(offsets) - 1
    out = np.full((num_perm, n), np.iinfo(np.uint32).max, dtype=np.uint32)
    mixed = _fmix32((shingles >> _U64(32)).astype(np.uint32))
    nonempty = np.flatnonzero(np.diff(offsets) > 0)
    starts = offsets[nonempty]
    ends = offsets[nonempty + 1]
    buffer = np.empty(_BLOCK, dtype=np.uint32)
    first = 0
    while first < len(nonempty):
        # A block of whole records holding about _BLOCK shingles (at least one record).
        last = max(first + 1, int(np.searchsorted(ends, starts[first] + _BLOCK, side="right")))
        low, high = int(starts[first]), int(ends[last - 1])
        block = mixed[low:high]
        permuted = buffer[: high - low] if high - low <= _BLOCK else np.empty(high - low, dtype=np.uint32)
        relative = starts[first:last] - low
        columns = nonempty[first:last]
        for p in range(num_perm):
            np.multiply(block, a[p], out=permuted)
            permuted += b[p]
            out[p, columns] = np.minimum.reduceat(permuted, relative)
        first = last
    # One row per record, so that a pair's two signatures are two contiguous reads.
    return np.ascontiguousarray(out.T)


_MAX32 = np.iinfo(np.uint32).max


def sketches(documents: Documents, signing: Signing) -> tuple[np.ndarray, np.ndarray]:
    """(the MinHash signature of every record, shape (records, num_perm), equal to `minhash` over its
    `shingles_of_words`; every record's word count).

    A record's shingles are those wholly inside one of its parts, plus those that cross a boundary
    between parts (plus, for a record shorter than a shingle, the one shingle of all its words).
    MinHash of a union is the elementwise minimum, so each distinct text's inner MinHash is computed
    once per batch of records it occurs in (TextTable.signatures, not kept past the batch) and a record
    only adds its few boundary shingles: a system prompt or a house reply shared by a million records
    is hashed once a batch, not a million times."""
    size, num_perm = signing.shingle_size, signing.num_perm
    table = documents.table
    word_hash, text_offsets = table.words()
    text_lengths = np.diff(text_offsets)
    signatures = np.empty((len(documents), num_perm), dtype=np.uint32)
    word_counts = np.zeros(len(documents), dtype=np.int64)
    for start, stop in documents.batches():
        records = stop - start
        parts = documents.parts[documents.offsets[start] : documents.offsets[stop]]
        used, part_text = np.unique(parts, return_inverse=True)  # the batch's texts; each part's among them
        text_signatures = table.signatures(used, signing)
        part_offsets = documents.offsets[start : stop + 1] - documents.offsets[start]
        part_lengths = text_lengths[parts]
        part_start = np.zeros(len(parts) + 1, dtype=np.int64)  # word positions within the batch
        np.cumsum(part_lengths, out=part_start[1:])
        record_start = part_start[part_offsets]
        lengths = np.diff(record_start)
        word_counts[start:stop] = lengths
        # The minimum over each record's parts, a part position at a time (numpy's 2-d reduceat is slow).
        inner = np.full((records, num_perm), _MAX32, dtype=np.uint32)
        part_counts = np.diff(part_offsets)
        for k in range(int(part_counts.max(initial=0))):
            having = np.flatnonzero(part_counts > k)
            inner[having] = np.minimum(inner[having], text_signatures[part_text[part_offsets[having] + k]])
        # Windows crossing a boundary: those starting in the size - 1 words before a part's start.
        part_record = np.repeat(np.arange(records), np.diff(part_offsets))
        later_parts = np.flatnonzero(np.arange(len(parts)) != part_offsets[part_record])
        window = np.repeat(part_start[later_parts] - size + 1, size - 1) + np.tile(
            np.arange(size - 1), len(later_parts)
        )
        owner = np.repeat(part_record[later_parts], size - 1)
        valid = (window >= record_start[owner]) & (window + size <= record_start[owner + 1])
        window = _sorted_unique(window[valid])
        # Records shorter than a shingle: one shingle of all their words, padded.
        short = np.flatnonzero((lengths > 0) & (lengths < size))
        starts = np.concatenate([window, record_start[short]])
        widths = np.concatenate([np.full(len(window), size), lengths[short]])
        order = np.argsort(starts, kind="stable")
        starts, widths = starts[order], widths[order]
        position = starts[:, None] + np.arange(size)[None, :]
        inside = np.arange(size)[None, :] < widths[:, None]
        position = np.where(inside, position, 0)
        part = np.searchsorted(part_start, position, side="right") - 1
        words = np.where(
            inside, word_hash[text_offsets[parts[part]] + (position - part_start[part])], _U64(0)
        )
        h = np.full(len(starts), _GOLDEN, dtype=np.uint64)
        h ^= _U64(size)
        for j in range(size):
            h ^= words[:, j]
            h *= _PRIME_64
        window_owner = np.searchsorted(record_start, starts, side="right") - 1
        window_offsets = np.zeros(records + 1, dtype=np.int64)
        np.cumsum(np.bincount(window_owner, minlength=records), out=window_offsets[1:])
        np.minimum(inner, minhash(_mix64(h), window_offsets, signing.permutation), out=signatures[start:stop])
    return signatures, word_counts


@dataclass(frozen=True)
class Fingerprints:
    """What the duplicate searches need of each record that is a function of the record alone: its
    content hash (content_hashes), word count and MinHash signature (sketches). Made per block where
    the records are screened, in parallel (tuneline/engines/blocks.py), so that the batch holds them
    and not the hashes of every record's words; the batch's signatures wait on its disk
    (tuneline/signature_store.py)."""

    content: np.ndarray  # uint64
    word_counts: np.ndarray  # int64
    signatures: Signatures  # uint32, (records, num_perm)
    shingle_size: int

    @classmethod
    def of(cls, documents: Documents, signing: Signing) -> Fingerprints:
        signatures, word_counts = sketches(documents, signing)
        return cls(content_hashes(documents), word_counts, signatures, signing.shingle_size)

    def signed_as(self, num_perm: int, shingle_size: int) -> bool:
        """Whether the signatures are those of `num_perm` permutations over `shingle_size` words."""
        return self.signatures.shape[1] == num_perm and self.shingle_size == shingle_size

    def subset(self, indices: np.ndarray) -> Fingerprints:
        return Fingerprints(
            self.content[indices],
            self.word_counts[indices],
            signature_rows(self.signatures, indices),
            self.shingle_size,
        )

    @classmethod
    def concat(cls, parts: Sequence[Fingerprints], signatures: SignatureStore | None = None) -> Fingerprints:
        """The parts' fingerprints, in order; `signatures`: where the parts' signatures were moved to
        already (each part then carries none: `without_signatures`)."""
        assert len({(p.signatures.shape[1], p.shingle_size) for p in parts}) == 1, "signed differently"
        content = np.concatenate([p.content for p in parts])
        joined: Signatures = (
            signatures
            if signatures is not None
            else np.concatenate([signature_rows(p.signatures, slice(None)) for p in parts])
        )
        assert len(joined) == len(content), "the stored signatures are not those of the parts"
        return cls(content, np.concatenate([p.word_counts for p in parts]), joined, parts[0].shingle_size)

    def without_signatures(self) -> Fingerprints:
        """These fingerprints once their signatures are stored elsewhere (concat's `signatures`)."""
        kept = np.empty((0, self.signatures.shape[1]), dtype=np.uint32)
        return Fingerprints(self.content, self.word_counts, kept, self.shingle_size)


def signature_rows(signatures: Signatures, indices: np.ndarray | slice) -> np.ndarray:
    """The signatures of some records (an index array, or a slice start:stop), in memory."""
    if isinstance(signatures, np.ndarray):
        return signatures[indices]
    if isinstance(indices, slice):
        start, stop, _ = indices.indices(len(signatures))
        return signatures.rows(start, stop)
    return signatures.take(indices)


def band_key(signatures: Signatures, banding: Banding, band: int) -> np.ndarray:
    """The 64-bit key of one band of every record: equal bands give equal keys."""
    n = len(signatures)
    keys = np.empty(n, dtype=np.uint64)
    # In memory, 4,096 records at a time: a block of signatures stays in cache while its band is
    # hashed. On disk, a band's values are read a column at a time, each contiguous.
    step = 4096 if isinstance(signatures, np.ndarray) else max(n, 1)
    for start in range(0, n, step):
        stop = min(start + step, n)
        h = np.full(stop - start, _GOLDEN, dtype=np.uint64)
        h ^= _U64(band)
        for row in range(band * banding.rows, (band + 1) * banding.rows):
            if isinstance(signatures, np.ndarray):
                h ^= signatures[start:stop, row]
            else:
                h ^= signatures.column(row, start, stop)
            h *= _PRIME_64
        keys[start:stop] = _mix64(h)
    return keys


def band_keys(signatures: Signatures, banding: Banding) -> np.ndarray:
    """A 64-bit key per band and record, shape (bands, records): equal bands give equal keys."""
    keys = np.empty((banding.bands, len(signatures)), dtype=np.uint64)
    for band in range(banding.bands):
        keys[band] = band_key(signatures, banding, band)
    return keys


class BandKeys:
    """The band keys of some records (band_keys), made a band at a time as candidate_pairs asks for
    them: it reads bands 0, 1; 1, 2; ...; the last, 0, so band 0 and the latest two are kept, three
    bands' keys at most instead of all of them (8 bytes a record each)."""

    def __init__(self, signatures: Signatures, banding: Banding) -> None:
        self.signatures = signatures
        self.banding = banding
        self.shape = (banding.bands, len(signatures))
        self._made: dict[int, np.ndarray] = {}

    def __getitem__(self, band: int) -> np.ndarray:
        found = self._made.get(band)
        if found is None:
            for older in [b for b in self._made if b not in (0, band - 1)]:
                del self._made[older]
            found = self._made[band] = band_key(self.signatures, self.banding, band)
        return found


def agreement(signatures: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """How many signature values each pair (first[k], second[k]) shares; over num_perm, an estimate
    of its Jaccard. On the flow's threads, 32,768 pairs per call (tuneline/threads.py)."""
    result = np.empty(len(first), dtype=np.int16)
    step = 1 << 15

    def count(start: int) -> None:
        stop = start + step
        equal = signatures[first[start:stop]] == signatures[second[start:stop]]
        result[start:stop] = equal.sum(axis=1)

    mapped(count, range(0, len(first), step))
    return result


class AgreementFilter:
    """The candidate pairs (pieces of pair codes over the records, `add`) that agree on enough
    signature values to be at or above the threshold (`pairs`): a pair at the threshold fails with
    probability below PREFILTER_MISS. Being a candidate only raises a pair's agreement, so the
    binomial cutoffs hold for candidates too.

    Two stages: the first, on the low 16 bits of the first _FIRST_STAGE values of each record (32
    bytes a record, held in memory: `leading`), drops pairs with a loose cutoff as each piece comes;
    the second decides those that passed it on their whole signatures, exactly. Cutting a value to 16
    bits can only make two values agree that did not (one chance in 65,536), so the first stage's
    count is at least the whole values' and drops no pair they would keep, and the second's decision
    is the one on whole signatures. Only the pairs that pass are kept, never the batch's candidate
    pairs (tens of millions a million records, for pairs that share a template). With at most 2 *
    _FIRST_STAGE values there is one stage, on all of them, whole. Signatures on disk
    (tuneline/signature_store.py) are read a few values of every record at a time: the second stage
    runs on up to _SECOND_STAGE_PAIRS pairs that passed the first at once, adding each further group's
    agreement (_SECOND_STAGE_GROUP values) to the pairs that can still reach the cutoff (counting the
    first values as the first stage's count, an upper bound), then counts the first values whole for
    the pairs left; the first stage's values and one group (64 bytes a record) are held, never whole
    signatures."""

    def __init__(self, signatures: Signatures, threshold: float) -> None:
        self.signatures = signatures
        self.n = len(signatures)
        self.num_perm = num_perm = signatures.shape[1]
        self.one_stage = num_perm <= 2 * _FIRST_STAGE
        if self.one_stage:
            self.leading = self._columns(0, num_perm)
        else:
            self.leading = np.empty((self.n, _FIRST_STAGE), dtype=np.uint16)
            for index in range(_FIRST_STAGE):  # a column at a time: bounded temporaries
                self.leading[:, index] = self._columns(index, index + 1)[:, 0] & np.uint32(0xFFFF)
        self.quick = (
            min_agreement(num_perm, threshold)
            if self.one_stage
            else min_agreement(_FIRST_STAGE, threshold, PREFILTER_MISS / 10)
        )
        self.cutoff = min_agreement(num_perm, threshold, PREFILTER_MISS * 9 / 10)
        self.proposed = 0  # pairs given (a pair in several pieces counted in each)
        self._passed: list[np.ndarray] = []  # codes of pairs that passed both stages
        # Codes that passed the first stage, with their count there, waiting for the second.
        self._waiting: list[tuple[np.ndarray, np.ndarray]] = []
        self._waiting_count = 0

    def _columns(self, start: int, stop: int) -> np.ndarray:
        if isinstance(self.signatures, np.ndarray):
            return self.signatures[:, start:stop]
        return self.signatures.columns(start, stop)

    def add(self, codes: np.ndarray) -> None:
        """A piece of candidate pairs, as pair codes (later * n + earlier)."""
        self.proposed += len(codes)
        counts = agreement(self.leading, codes // self.n, codes % self.n)
        passed = counts >= self.quick
        codes = codes[passed]
        if self.one_stage:
            self._passed.append(codes)
        elif isinstance(self.signatures, np.ndarray):
            close = agreement(self.signatures, codes // self.n, codes % self.n) >= self.cutoff
            self._passed.append(codes[close])
        else:
            self._waiting.append((codes, counts[passed].astype(np.int8)))
            self._waiting_count += len(codes)
            if self._waiting_count >= _SECOND_STAGE_PAIRS:
                self._decide_waiting()

    def _decide_waiting(self) -> None:
        """The second stage on signatures on disk, for the pairs waiting: each group of values after
        the first stage's added to the pairs that can still reach the cutoff (their first values
        counted as in the first stage, at least their whole count), then the first values counted
        whole for the pairs left (few: counting them whole for every pair first took half as long
        again)."""
        if not self._waiting:
            return
        codes = np.concatenate([piece[0] for piece in self._waiting])
        counts = np.concatenate([piece[1] for piece in self._waiting]).astype(np.int16)
        self._waiting, self._waiting_count = [], 0
        for start in range(_FIRST_STAGE, self.num_perm, _SECOND_STAGE_GROUP):
            # Pairs that fall short even if every value left agreed are decided: not near.
            self._add_group(codes, counts, start, counts + (self.num_perm - start) >= self.cutoff)
        left = np.flatnonzero(counts >= self.cutoff)
        codes, counts = codes[left], counts[left]
        counts -= agreement(self.leading, codes // self.n, codes % self.n)  # the first stage's count out
        for start in range(0, _FIRST_STAGE, _SECOND_STAGE_GROUP):
            self._add_group(codes, counts, start, np.ones(len(codes), dtype=bool))
        self._passed.append(codes[counts >= self.cutoff])

    def _add_group(self, codes: np.ndarray, counts: np.ndarray, start: int, open_mask: np.ndarray) -> None:
        """Each open pair's agreement on the group of values from `start` added to its count."""
        group = self._columns(start, min(start + _SECOND_STAGE_GROUP, self.num_perm))
        open_pairs = np.flatnonzero(open_mask)
        for at in range(0, len(open_pairs), _PAIRS_AT_ONCE):  # bounded temporaries
            chosen = open_pairs[at : at + _PAIRS_AT_ONCE]
            counts[chosen] += agreement(group, codes[chosen] // self.n, codes[chosen] % self.n)

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """The pairs (later, earlier) given that passed, each once, sorted by code."""
        self._decide_waiting()
        passed, self._passed = self._passed, []
        return pairs_of(passed, self.n)


def candidate_pieces(
    keys: np.ndarray | BandKeys, rank: np.ndarray, eligible: np.ndarray
) -> Iterator[np.ndarray]:
    """The candidate pairs of eligible records that share a band bucket, a band at a time: each band's
    pairs as distinct pair codes (later * n + earlier, by rank), sorted. A pair found in several bands
    is in each of their pieces; `candidate_pairs` is their union.

    A bucket can hold thousands of records that share a template (system prompt, house reply), so not
    all its pairs are proposed: within the bucket of band b, records are ordered by their key of band
    b + 1 (then by rank), which puts records that also share that band, the likely near-duplicates,
    side by side; each record is paired with the first of its run of equal band-(b + 1) keys and with
    its NEIGHBOURS predecessors in that order. At most bands * (NEIGHBOURS + 1) pairs per record:
    linear."""
    n = keys.shape[1]
    bands = keys.shape[0]
    members = np.flatnonzero(eligible)
    if len(members) < 2:
        return
    members = members[np.argsort(rank[members], kind="stable")]
    position = np.arange(len(members))
    for band in range(bands):
        key, following = keys[band], keys[(band + 1) % bands]
        # Stable sorts: by the next band's key within a bucket, and by rank within a run.
        order = members[np.argsort(following[members], kind="stable")]
        order = order[np.argsort(key[order], kind="stable")]
        sorted_key, sorted_following = key[order], following[order]
        del key, following
        pieces = _band_pairs(order, sorted_key, sorted_following, position, rank, n)
        del order, sorted_key, sorted_following
        if pieces:
            yield distinct_pair_codes(pieces)


def candidate_pairs(
    keys: np.ndarray | BandKeys, rank: np.ndarray, eligible: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (later, earlier) by rank of eligible records that share a band bucket, each pair once
    (the union of `candidate_pieces`)."""
    return pairs_of(candidate_pieces(keys, rank, eligible), keys.shape[1])


def pairs_of(pieces: Iterable[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The union of pieces of pair codes over n records, as pairs (later, earlier), sorted by code."""
    codes = distinct_pair_codes(list(pieces))
    return codes // n, codes % n


def _band_pairs(
    order: np.ndarray,
    sorted_key: np.ndarray,
    sorted_following: np.ndarray,
    position: np.ndarray,
    rank: np.ndarray,
    n: int,
) -> list[np.ndarray]:
    """The pair codes of one band (candidate_pairs): `order` holds records sorted by (band key, next
    band's key, rank), with their keys; `position` is arange(len(order)) or longer. Pairs are made
    within a bucket only, so a subset of whole buckets gives exactly those buckets' pairs."""
    if not len(order):
        return []
    position = position[: len(order)]
    new_bucket = np.empty(len(order), dtype=bool)
    new_bucket[0] = True
    np.not_equal(sorted_key[1:], sorted_key[:-1], out=new_bucket[1:])
    new_run = new_bucket.copy()
    new_run[1:] |= sorted_following[1:] != sorted_following[:-1]
    bucket_head = np.maximum.accumulate(np.where(new_bucket, position, 0))
    run_head = np.maximum.accumulate(np.where(new_run, position, 0))
    shared = np.flatnonzero(~new_bucket)
    if not len(shared):
        return []
    inside = shared[run_head[shared] != shared]
    found = [_pair_codes(order[inside], order[run_head[inside]], rank, n)]
    for distance in range(1, NEIGHBOURS + 1):
        behind = shared[shared - distance >= bucket_head[shared]]
        found.append(_pair_codes(order[behind], order[behind - distance], rank, n))
    return found


def band_bucket_pairs(
    records: np.ndarray, key: np.ndarray, following: np.ndarray, rank: np.ndarray, n: int
) -> list[np.ndarray]:
    """The pair codes (later * n + earlier) candidate_pairs makes in one band, for some of its entries:
    `records` with their band key and next band's key. Given every entry of some whole buckets, these
    are exactly the pairs candidate_pairs makes in those buckets: the reduce step of a distributed
    search that shuffles the entries by bucket (tuneline/engines/ray_engine.py)."""
    order = np.lexsort((rank[records], following, key))
    return _band_pairs(records[order], key[order], following[order], np.arange(len(order)), rank, n)


def distinct_pair_codes(pieces: Sequence[np.ndarray]) -> np.ndarray:
    """Pair codes from several pieces, sorted, each once: the union of candidate pairs."""
    if not pieces:
        return np.zeros(0, dtype=np.int64)
    pairs = np.concatenate(pieces)
    pairs.sort()
    keep = np.ones(len(pairs), dtype=bool)
    np.not_equal(pairs[1:], pairs[:-1], out=keep[1:])
    return pairs[keep]


def _pair_codes(first: np.ndarray, second: np.ndarray, rank: np.ndarray, n: int) -> np.ndarray:
    """later * n + earlier for each pair, whichever of the two comes later by rank."""
    later_first = rank[first] > rank[second]
    return np.where(later_first, first, second) * n + np.where(later_first, second, first)


class _ShingleSets:
    """Exact shingle sets of some records, computed on demand from their text and kept: all of them, or
    the `limit` most recently used (a set of tuples of words takes about 150 bytes a shingle, several
    kB a record: kept for every record of 15,000 near-duplicate pairs, a few hundred MB a million)."""

    def __init__(self, documents: Documents, size: int, limit: int | None = None) -> None:
        self.documents = documents
        self.size = size
        self.limit = limit
        self._sets: dict[int, frozenset[tuple[str, ...]]] = {}  # in order of last use when limited

    def __call__(self, index: int) -> frozenset[tuple[str, ...]]:
        found = self._sets.pop(index, None) if self.limit else self._sets.get(index)
        if found is None:
            found = word_shingles(self.documents.text(index), self.size)
            self._make_room()
        self._sets[index] = found
        return found

    def read_ahead(self, indices: np.ndarray) -> None:
        """The sets of the records `indices` not kept yet, made now from their texts read at once (in
        store order: Documents.texts), as the most recently used."""
        missing = [index for index in dict.fromkeys(indices.tolist()) if index not in self._sets]
        for index, text in zip(
            missing, self.documents.texts(np.asarray(missing, dtype=np.int64)), strict=True
        ):
            self._make_room()
            self._sets[index] = word_shingles(text, self.size)

    def _make_room(self) -> None:
        if self.limit and len(self._sets) >= self.limit:
            del self._sets[next(iter(self._sets))]  # the least recently used


@dataclass(frozen=True)
class _DistinctShingles:
    """The distinct 32-bit shingle hashes of some records, each record's sorted."""

    hashes: np.ndarray  # uint32 (widened a chunk of pairs at a time in `shared`, a pair id above them)
    offsets: np.ndarray
    sizes: np.ndarray

    @classmethod
    def of(cls, documents: Documents, indices: np.ndarray, size: int) -> _DistinctShingles:
        """Those of the records `indices`, a batch of records per call on the flow's threads
        (tuneline/threads.py: reading, splitting and sorting release the interpreter's lock)."""
        texts = Documents(documents.table, documents.parts, documents.offsets)  # words only: no fingerprints

        def batch(start: int) -> tuple[np.ndarray, np.ndarray]:
            chunk = indices[start : start + BATCH]
            shingles, offsets = shingles_of_words(*texts.subset(chunk).words(), size)
            owner = np.repeat(np.arange(len(chunk), dtype=np.uint64), np.diff(offsets))
            keys = (owner << _U64(32)) | (shingles >> _U64(32))
            del shingles, owner
            keys.sort()
            keep = np.ones(len(keys), dtype=bool)
            np.not_equal(keys[1:], keys[:-1], out=keep[1:])
            keys = keys[keep]
            sizes = np.bincount((keys >> _U64(32)).astype(np.int64), minlength=len(chunk))
            return (keys & _U64(0xFFFFFFFF)).astype(np.uint32), sizes

        pieces = mapped(batch, range(0, len(indices), BATCH))
        sizes = np.concatenate([piece[1] for piece in pieces]) if pieces else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        hashes = np.concatenate([piece[0] for piece in pieces]) if pieces else np.zeros(0, dtype=np.uint32)
        return cls(hashes, offsets, sizes)

    def shared(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """For each pair (first[k], second[k]) of positions: how many hashes the two records share."""
        result = np.zeros(len(first), dtype=np.int64)
        step = 1 << 13  # pairs at once: tens of MB of temporaries for chats of a hundred words

        def count(start: int) -> None:  # on the flow's threads (tuneline/threads.py)
            a, b = first[start : start + step], second[start : start + step]
            starts = np.stack([self.offsets[a], self.offsets[b]], axis=1).ravel()
            lengths = np.stack([self.sizes[a], self.sizes[b]], axis=1).ravel()
            pair = np.repeat(np.arange(len(a), dtype=np.uint64), self.sizes[a] + self.sizes[b])
            keys = pair << _U64(32)
            keys |= self.hashes[_ranges(starts, lengths)]
            # Two sorted runs per pair, pairs in order: the stable sort (timsort) merges them in
            # about linear time.
            keys.sort(kind="stable")
            equal = keys[1:] == keys[:-1]
            result[start : start + len(a)] = np.bincount(
                (keys[1:][equal] >> _U64(32)).astype(np.int64), minlength=len(a)
            )

        mapped(count, range(0, len(first), step))
        return result


@dataclass(frozen=True)
class NearDuplicates:
    """For each record: the index of the earlier kept record it nearly duplicates (-1: kept) and their
    exact Jaccard similarity (nan when kept); and how much work finding them took."""

    duplicate_of: np.ndarray
    similarity: np.ndarray
    candidates: int  # pairs proposed by LSH (a pair proposed by several bands counted in each)
    compared: int  # pairs whose shingle sets were compared (those that passed the signature filter)
    confirmed: int  # pairs whose Jaccard was computed on the words themselves


# The candidate search of find_near_duplicates: (signatures, eligible, rank, banding) -> the pairs of
# eligible records that candidate_pairs gives, as pieces of pair codes (later * n + earlier), which
# the caller filters as they come (AgreementFilter). `local_candidates` runs it in this process, a band
# at a time; the ray engine as map (band keys per block) -> shuffle (band entries by bucket) -> reduce
# (pairs per bucket, a reducer's a piece).
CandidateSearch = Callable[[Signatures, np.ndarray, np.ndarray, Banding], Iterable[np.ndarray]]


def local_candidates(
    signatures: Signatures, eligible: np.ndarray, rank: np.ndarray, banding: Banding
) -> Iterator[np.ndarray]:
    """Band keys and candidate pairs of the eligible records, here, a band at a time: the next band's
    made in a second thread while the caller filters this one's (tuneline/threads.py; the ray
    engine's reducers run beside the flow already)."""
    return prefetched(candidate_pieces(BandKeys(signatures, banding), rank, eligible))


def find_near_duplicates(
    documents: Documents,
    rank: np.ndarray,
    *,
    threshold: float,
    num_perm: int,
    shingle_size: int,
    candidates: CandidateSearch | None = None,
    eligible: np.ndarray | None = None,
) -> NearDuplicates:
    """Mark each record whose word-shingle Jaccard with an earlier (lower rank) *kept* record is >=
    threshold; the earlier one stays kept. Records are decided in rank order, so a record similar only
    to a record that is itself a near-duplicate stays kept. Records without words are never
    near-duplicates (exact duplicates are another rule). Only the `eligible` records (default: all)
    are looked at: the others are neither marked nor named, as if they were not there. The records'
    fingerprints are used if they were signed so, else made here."""
    n = len(documents)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    similarity = np.full(n, np.nan)
    if n < 2:
        return NearDuplicates(duplicate_of, similarity, 0, 0, 0)
    rank = np.asarray(rank)
    fingerprints = documents.fingerprints
    if fingerprints is None or not fingerprints.signed_as(num_perm, shingle_size):
        fingerprints = Fingerprints.of(documents, signing(num_perm, shingle_size))
        documents.table.forget_caches()  # what matching against references left: not needed here
        release_free_memory()  # the signing's temporaries (tuneline/heap.py)
    signatures = fingerprints.signatures
    eligible = fingerprints.word_counts > 0 if eligible is None else eligible & (fingerprints.word_counts > 0)
    search = candidates or local_candidates
    agreeing = AgreementFilter(signatures, threshold)
    for piece in search(signatures, eligible, rank, banding_for(num_perm, threshold)):
        agreeing.add(piece)
        del piece
    later, earlier = agreeing.pairs()
    proposed, compared = agreeing.proposed, len(later)
    del agreeing, signatures, fingerprints
    release_free_memory()  # the candidate pairs' temporaries (tuneline/heap.py)
    # The Jaccard of the 32-bit hashed shingles: pairs under the threshold are not duplicates (unless
    # two of their shingles share a 32-bit hash, about 4e-6 per pair, and the pair sits within a
    # shingle of the threshold).
    bound = _hashed_jaccard(documents, later, earlier, shingle_size)
    similar = bound >= threshold
    later, earlier, bound = later[similar], earlier[similar], bound[similar]
    # Decide records in rank order; for each, try its candidates from the most to the least similar.
    order = np.lexsort((rank[earlier], -bound, rank[later]))
    exact = _ShingleSets(documents, shingle_size, limit=_RECENT_SETS)
    later, earlier = later[order], earlier[order]
    confirmed = 0
    tried: set[int] = set()
    current = -1
    for at, (later_index, earlier_index) in enumerate(zip(later.tolist(), earlier.tolist(), strict=True)):
        if at % _READ_AHEAD_PAIRS == 0:  # the next pairs' texts read at once, not a record at a time
            window = slice(at, at + _READ_AHEAD_PAIRS)
            exact.read_ahead(np.concatenate([later[window], earlier[window]]))
        if later_index != current:
            current, tried = later_index, set()
        if duplicate_of[later_index] >= 0:
            continue
        # A near-duplicate of a record that is itself a near-duplicate is compared with the kept
        # record that one duplicates.
        target = earlier_index if duplicate_of[earlier_index] < 0 else int(duplicate_of[earlier_index])
        if target in tried:
            continue
        tried.add(target)
        confirmed += 1
        # Decided on the words themselves, so a hash collision can never make a duplicate.
        value = jaccard(exact(later_index), exact(target))
        if value >= threshold:
            duplicate_of[later_index] = target
            similarity[later_index] = value
    return NearDuplicates(duplicate_of, similarity, proposed, compared, confirmed)


def _hashed_jaccard(documents: Documents, later: np.ndarray, earlier: np.ndarray, size: int) -> np.ndarray:
    """The Jaccard of the distinct 32-bit shingle hashes of each pair's two records, for
    _SHINGLE_PAIRS pairs at a time: the records of that many pairs have their shingles made and let
    go (a record in pairs of several chunks is made again in each), so what is held is bounded by the
    chunk, not by the batch (a few hundred bytes a record: most records are in some pair at ten
    million)."""
    bound = np.ones(len(later))
    for start in range(0, len(later), _SHINGLE_PAIRS):
        chunk_later, chunk_earlier = (
            later[start : start + _SHINGLE_PAIRS],
            earlier[start : start + _SHINGLE_PAIRS],
        )
        involved = _sorted_unique(np.concatenate([chunk_later, chunk_earlier]))
        shingles = _DistinctShingles.of(documents, involved, size)
        documents.table.forget_caches()  # the hash of every word of the records in pairs
        at_later, at_earlier = (
            np.searchsorted(involved, chunk_later),
            np.searchsorted(involved, chunk_earlier),
        )
        shared = shingles.shared(at_later, at_earlier)
        union = shingles.sizes[at_later] + shingles.sizes[at_earlier] - shared
        np.divide(shared, union, out=bound[start : start + len(shared)], where=union > 0)
        del shingles, involved, at_later, at_earlier, shared, union
    return bound


# --------------------------------------------------------------------------------------------------
# Matching against a small reference set.


@dataclass(frozen=True)
class Matches:
    """For each query: the index of its most similar reference at or above the threshold (-1: none)
    and their exact Jaccard similarity (1.0 for equal texts, nan for none)."""

    reference: np.ndarray
    similarity: np.ndarray
    candidates: int = 0  # queries that passed the containment filter


_KEPT_BITS = 40  # of a shingle hash, when a record number has to fit above it


def distinct_shingles(shingles: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each record's distinct shingles (their hashes' top 40 bits), sorted, and their offsets. At most
    2**24 records at a time: the record number sits above the 40 bits, so one plain sort suffices."""
    counts = np.diff(offsets)
    if len(counts) > 1 << (64 - _KEPT_BITS):
        raise ValueError("distinct_shingles takes at most 2**24 records at a time")
    owner = np.repeat(np.arange(len(counts), dtype=np.uint64), counts)
    keys = (owner << _U64(_KEPT_BITS)) | (shingles >> _U64(64 - _KEPT_BITS))
    keys.sort()
    keep = np.ones(len(keys), dtype=bool)
    np.not_equal(keys[1:], keys[:-1], out=keep[1:])
    keys = keys[keep]
    distinct_offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(
        np.bincount((keys >> _U64(_KEPT_BITS)).astype(np.int64), minlength=len(counts)),
        out=distinct_offsets[1:],
    )
    return keys & _U64((1 << _KEPT_BITS) - 1), distinct_offsets


def find_matches(
    queries: Documents, references: Documents, *, threshold: float, shingle_size: int
) -> Matches:
    """Match each query to the reference whose normalised text it equals or, failing that, to the
    reference with the highest word-shingle Jaccard >= threshold (ties: the first reference). Empty
    queries match nothing. Exact, with no sketch: a query can reach Jaccard t with some reference only
    if at least t of its distinct shingles occur among the references' shingles, so only queries that
    pass that count are compared, reference by reference. Linear in the queries; meant for a small
    reference set (an eval set). Queries that are each one text of the table (Documents.of_texts) are
    matched once per distinct text, from the shingles the table keeps."""
    n, m = len(queries), len(references)
    matched = np.full(n, -1, dtype=np.int64)
    similarity = np.full(n, np.nan)
    if not n or not m:
        return Matches(matched, similarity)
    reference_keys = content_hashes(references)
    reference_by_key: dict[int, list[int]] = {}
    for index, key in enumerate(reference_keys.tolist()):
        reference_by_key.setdefault(key, []).append(index)
    query_keys = content_hashes(queries)
    for query in np.flatnonzero(np.isin(query_keys, reference_keys)).tolist():
        text = queries.text(query)
        for reference in reference_by_key[int(query_keys[query])]:
            if text and references.text(reference) == text:
                matched[query], similarity[query] = reference, 1.0
                break

    best = _BestReference(references, threshold, shingle_size)
    candidates = 0
    counts = np.diff(queries.offsets)
    if (counts <= 1).all():
        # One text per query: each distinct text is matched once, its shingles taken from the table.
        table = queries.table

        def text_sets(text: int) -> frozenset[tuple[str, ...]]:
            return word_shingles(table.texts[text], shingle_size)

        open_queries = np.flatnonzero((matched < 0) & (counts == 1))  # an empty query matches nothing
        text_of = queries.parts[queries.offsets[open_queries]]
        texts = _sorted_unique(text_of)
        text_match = np.full(len(table), -1, dtype=np.int64)
        text_similarity = np.full(len(table), np.nan)
        compared: list[np.ndarray] = []
        for start in range(0, len(texts), BATCH):
            batch = texts[start : start + BATCH]
            found = best.search(*_text_shingles(table, batch, shingle_size), batch, text_sets)
            for text_id, (reference, value) in found.items():
                if reference >= 0:
                    text_match[text_id], text_similarity[text_id] = reference, value
            compared.append(np.fromiter(found, dtype=np.int64, count=len(found)))
        matched[open_queries] = text_match[text_of]
        similarity[open_queries] = np.where(
            text_match[text_of] >= 0, text_similarity[text_of], similarity[open_queries]
        )
        if compared:
            candidates = int(np.isin(text_of, np.concatenate(compared)).sum())
        return Matches(matched, similarity, candidates)

    query_sets = _ShingleSets(queries, shingle_size)
    for start, stop in queries.batches():
        shingles, offsets = shingles_of_words(*queries.words(start, stop), shingle_size)
        open_ = np.flatnonzero(matched[start:stop] < 0)
        found = best.search(*_subset_ranges(shingles, offsets, open_), start + open_, query_sets)
        candidates += len(found)
        for query, (reference, value) in found.items():
            if reference >= 0:
                matched[query], similarity[query] = reference, value
    return Matches(matched, similarity, candidates)


def _subset_ranges(
    values: np.ndarray, offsets: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The ranges values[offsets[r]:offsets[r + 1]] of `rows`, concatenated, and their offsets."""
    counts = offsets[rows + 1] - offsets[rows]
    subset_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(counts, out=subset_offsets[1:])
    return values[_ranges(offsets[rows], counts)], subset_offsets


def _text_shingles(table: TextTable, ids: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """shingles_of_words of each text `ids` as a record of its own, from the table's inner shingles
    (a text shorter than a shingle: its one padded shingle)."""
    inner, inner_offsets = table.inner_shingles(size)
    word_hash, word_offsets = table.words()
    lengths = word_offsets[ids + 1] - word_offsets[ids]
    inner_counts = inner_offsets[ids + 1] - inner_offsets[ids]
    short = np.flatnonzero((lengths > 0) & (lengths < size))
    counts = inner_counts.copy()
    counts[short] = 1
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    shingles = np.empty(int(offsets[-1]), dtype=np.uint64)
    shingles[_ranges(offsets[:-1], inner_counts)] = inner[_ranges(inner_offsets[ids], inner_counts)]
    if len(short):
        words = word_hash[_ranges(word_offsets[ids[short]], lengths[short])]
        first = np.zeros(len(short), dtype=np.int64)
        np.cumsum(lengths[short][:-1], out=first[1:])
        shingles[offsets[short]] = _combine(words, first, lengths[short], size)
    return shingles, offsets


class _BestReference:
    """The search for a query's most similar reference, on the references' distinct shingles.

    Shingles are compared by the top 40 bits of their hash: a collision can only add a candidate, and
    every match is confirmed on the words. Two filters, each passed by every query that can match,
    keep the sorting and the Python loop to the few queries that might: a query can reach Jaccard t
    with reference R only if it holds at least t * |R| of R's shingles (counted with repeats here, an
    upper bound), and at least t of its own distinct shingles are among the references' shingles."""

    _BITMAP_BITS = 22

    def __init__(self, references: Documents, threshold: float, size: int) -> None:
        self.threshold = threshold
        self.exact = _ShingleSets(references, size)
        m = len(references)
        pieces: list[np.ndarray] = []
        owners: list[np.ndarray] = []
        self.sizes = np.zeros(m, dtype=np.int64)
        for start, stop in references.batches():
            shingles, offsets = distinct_shingles(*shingles_of_words(*references.words(start, stop), size))
            self.sizes[start:stop] = np.diff(offsets)
            pieces.append(shingles)
            owners.append(start + np.repeat(np.arange(stop - start, dtype=np.int64), np.diff(offsets)))
        keys = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint64)
        owner = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)
        # The references of each distinct key (postings), references in order within a key.
        order = np.lexsort((owner, keys))
        keys, owner = keys[order], owner[order]
        first = np.ones(len(keys), dtype=bool)
        np.not_equal(keys[1:], keys[:-1], out=first[1:])
        self.vocabulary = keys[first]
        self.posting_offsets = np.append(np.flatnonzero(first), len(keys)).astype(np.int64)
        self.posting_references = owner
        self._mask = _U64((1 << self._BITMAP_BITS) - 1)
        self._bitmap = np.zeros(1 << self._BITMAP_BITS, dtype=bool)
        self._bitmap[(self.vocabulary & self._mask).astype(np.int64)] = True

    def _vocabulary_index(self, keys: np.ndarray) -> np.ndarray:
        """For each key (top 40 bits of a shingle hash): its index in the vocabulary, or -1."""
        index = np.full(len(keys), -1, dtype=np.int64)
        if not len(self.vocabulary):
            return index
        maybe = np.flatnonzero(self._bitmap[(keys & self._mask).astype(np.int64)])
        where = np.minimum(np.searchsorted(self.vocabulary, keys[maybe]), len(self.vocabulary) - 1)
        hit = self.vocabulary[where] == keys[maybe]
        index[maybe[hit]] = where[hit]
        return index

    def search(
        self,
        shingles: np.ndarray,
        offsets: np.ndarray,
        ids: np.ndarray,
        exact_set: Callable[[int], frozenset[tuple[str, ...]]],
    ) -> dict[int, tuple[int, float]]:
        """For queries `ids` with these 64-bit shingle hashes (shingles_of_words): the queries that
        pass both filters, by id, each with its best reference at or above the threshold and their
        exact Jaccard ((-1, nan) for none). `exact_set(id)`: the query's shingle set."""
        count = len(offsets) - 1
        m = len(self.sizes)
        index = self._vocabulary_index(shingles >> _U64(64 - _KEPT_BITS))
        hits = np.flatnonzero(index >= 0)
        owner = np.searchsorted(offsets, hits, side="right") - 1
        starts = self.posting_offsets[index[hits]]
        lengths = self.posting_offsets[index[hits] + 1] - starts
        codes = np.repeat(owner, lengths) * m + self.posting_references[_ranges(starts, lengths)]
        if count * m <= 1 << 24:
            shared = np.bincount(codes, minlength=count * m)
            pairs = np.flatnonzero(shared)
            shared = shared[pairs]
        else:
            pairs, shared = np.unique(codes, return_counts=True)
        # A tolerance against rounding: the filter may only let more queries through.
        possible = shared >= self.threshold * self.sizes[pairs % m] - 1e-9
        rows = _sorted_unique(pairs[possible] // m)
        if not len(rows):
            return {}
        subset, subset_offsets = distinct_shingles(*_subset_ranges(shingles, offsets, rows))
        return self._best(subset, subset_offsets, ids[rows], exact_set)

    def _best(
        self,
        shingles: np.ndarray,
        offsets: np.ndarray,
        ids: np.ndarray,
        exact_set: Callable[[int], frozenset[tuple[str, ...]]],
    ) -> dict[int, tuple[int, float]]:
        """search, on the queries' distinct shingles (top 40 bits, sorted: distinct_shingles)."""
        count = len(offsets) - 1
        sizes = np.diff(offsets)
        index = self._vocabulary_index(shingles)
        hit = index >= 0
        hits = np.bincount(np.repeat(np.arange(count), sizes)[hit], minlength=count)
        chosen = np.flatnonzero((sizes > 0) & (hits >= self.threshold * sizes))
        found: dict[int, tuple[int, float]] = {}
        offsets_list = self.posting_offsets.tolist()
        for local in chosen.tolist():
            query = int(ids[local])
            found[query] = (-1, float("nan"))
            shared: dict[int, int] = {}
            segment = slice(int(offsets[local]), int(offsets[local + 1]))
            for key in index[segment][hit[segment]].tolist():
                for reference in self.posting_references[offsets_list[key] : offsets_list[key + 1]].tolist():
                    shared[reference] = shared.get(reference, 0) + 1
            size = int(sizes[local])
            scored = sorted(
                ((common / (size + int(self.sizes[r]) - common), r) for r, common in shared.items()),
                key=lambda pair: (-pair[0], pair[1]),
            )
            for value, reference in scored:
                if value < self.threshold:
                    break
                # Confirmed on the words themselves: a hash collision can never make a match.
                confirmed = jaccard(exact_set(query), self.exact(reference))
                if confirmed >= self.threshold:
                    found[query] = (reference, confirmed)
                    break
        return found
