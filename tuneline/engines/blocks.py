"""The unit of the data plane's per-partition work, the same for every engine: a block of input.

`plan(files, execution)` cuts the selected input files into blocks: `execution.files_per_task`
consecutive files (in the order `ingest.select_files` sorted them), and every uncompressed JSONL file
larger than `execution.block_bytes` cut into line-aligned parts of about that size
(`ingest.line_ranges`), each a block of its own, so that one large partition file is spread over
every core. `screen_block` is what one task does with a block: read it (tasks/ingest.py's
`read_files`), apply the format rules and count exact tokens (tasks/validate.py's `validate`), then
the per-record rules of dedupe (tasks/dedupe.py's `per_record_rules`: credentials and PII, eval
leakage) and the normalised forms the duplicate rules compare, as Documents with their fingerprints
(content hash, word count, MinHash signature: tuneline/near_duplicates.py's Fingerprints), so that
the signing is spread over the blocks and the batch holds no record's words; the normalised texts
themselves go back packed (Documents.packed) and wait in the batch's store with the raw texts, read
back only for the records the duplicate searches compare. No later rule changes
an example, so the block's frame carries each example as the training line export writes for it
(tasks/export.py's `with_training_lines`), and packs those lines and the raw texts into one byte
string (tuneline/text_store.py: one object to pickle back to the flow, or a file of its own written by
the task, `Screened.spilled`), which the flow moves to the batch's TextStore on disk as the block comes
back (`BatchOnDisk`), and the block's signatures to the batch's SignatureStore
(tuneline/signature_store.py).

Every one of those is a function of one record alone (and the eval set), a part of a file numbers its
lines from the line it starts at, and record ids are made from the record's file, partition, line
and text: so the blocks' results, put together in block order (`concat`: frames concatenated,
Documents over one table), are row for row what one pass over all the files makes (once their texts
are read back from the store: text_store.unpacked). The engines differ only in where the blocks run:
this machine's processes (tuneline/engines/local.py) or Ray tasks (tuneline/engines/ray_engine.py).
The batch-wide rules (rules 3 to 5 of tasks/dedupe.py, `batch_rules`) then run on the whole frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import fsspec
import numpy as np
import pandas as pd
from pandas.api.types import union_categoricals

from tuneline import heap
from tuneline.config import Config, CsvMapping, DedupeConfig, ExecutionConfig, ModelConfig, ValidationConfig
from tuneline.near_duplicates import Documents, Signing, signing
from tuneline.signature_store import SignatureStore
from tuneline.tasks import dedupe, export, ingest, validate
from tuneline.text_store import TextStore, moved, pack


@dataclass(frozen=True)
class Screened:
    """A block (or a batch) after the per-record rules: the record frame, the normalised examples of
    its rows that the duplicate rules look at (those kept after rule 1), in frame order, and the store
    of the frame's raw texts and training lines (in memory for a block, on disk for a batch)."""

    frame: pd.DataFrame
    documents: Documents
    texts: TextStore

    def spilled(self, directory: str) -> Screened:
        """This block's result with its stores' bytes in files of `directory` (TextStore.spilled): what
        a worker of the local engine sends back, so that its texts reach the batch's store on disk
        without passing through the pipe to the flow's process."""
        return Screened(self.frame, self.documents.spilled(directory), self.texts.spilled(directory))


@dataclass(frozen=True)
class Block:
    """Input files (or parts of one) read by one task, and their size in bytes (0 where unknown)."""

    files: list[ingest.InputFile]
    size: int


def plan(files: Sequence[ingest.InputFile], execution: ExecutionConfig) -> list[Block]:
    """The blocks of `files`, in order (see the module docstring)."""
    found: list[Block] = []
    pending: list[ingest.InputFile] = []
    pending_size = 0

    def close() -> None:
        nonlocal pending, pending_size
        if pending:
            found.append(Block(pending, pending_size))
            pending, pending_size = [], 0

    for file in files:
        size = _file_size(file)  # one look per file: on an object store, each is a request
        parts = ingest.line_ranges(file, execution.block_bytes) if size > execution.block_bytes else [file]
        if len(parts) > 1:
            close()
            found.extend(Block([part], (part.stop or size) - part.start) for part in parts)
            continue
        pending.append(file)
        pending_size += size
        if len(pending) >= execution.files_per_task:
            close()
    close()
    return found


def _file_size(file: ingest.InputFile) -> int:
    try:
        fs, path = fsspec.core.url_to_fs(file.uri)
        return int(fs.size(path) or 0)
    except (OSError, ValueError):
        return 0  # reading it reports the problem


def screen_block(
    files: Sequence[ingest.InputFile],
    eval_examples: Sequence[Any],
    system_prompt: str | None,
    csv_fallbacks: Sequence[CsvMapping],
    model: ModelConfig,
    validation: ValidationConfig,
    dedupe_config: DedupeConfig,
    method: str,
    record_signing: Signing,
) -> Screened:
    """What one task does: a block of files read, validated (as lines of a `method` training file),
    put through the per-record rules of dedupe (credentials and PII, leakage into `eval_examples`),
    and its records' fingerprints made (signed by `record_signing`, which block_arguments makes: a
    block's task never imports datasketch). The block's records and their texts all stay alive to the
    end: the cyclic collector is paused meanwhile (tuneline/heap.py)."""
    with heap.collector_paused():
        frame = ingest.read_files(files, system_prompt, csv_fallbacks)
        frame = validate.validate(frame, model, validation, method)
        frame, documents = dedupe.per_record_rules(frame, eval_examples, dedupe_config)
        # The fingerprints, and the normalised texts the records use packed into one byte string.
        documents = documents.fingerprinted(record_signing).packed()
        # No later rule changes an example: from here on each one is the line export writes for it,
        # and it and the raw text wait in the store (text_store.py) until export reads them.
        frame, texts = pack(export.with_training_lines(frame))
        return Screened(frame, documents, texts)


def block_arguments(config: Config) -> tuple[Any, ...]:
    """screen_block's arguments after the files and the eval set, from the run's config."""
    fallbacks = [s.csv_mapping for s in config.data.sources if s.csv_mapping is not None]
    return (
        config.model.system_prompt,
        fallbacks,
        config.model,
        config.validation,
        config.dedupe,
        config.training.method,
        signing(config.dedupe.num_perm, config.dedupe.shingle_size),
    )


class BatchOnDisk:
    """The batch's texts (a TextStore: raw texts, training lines and the normalised texts the
    duplicate searches compare) and signatures (a SignatureStore, made with the first block that
    brings any) on disk, which each block's join as soon as the block comes back (`stored`): the flow
    never holds the texts or signatures of more than one block at once."""

    def __init__(self) -> None:
        self.store = TextStore.on_disk()
        self.signatures: SignatureStore | None = None

    def stored(self, result: Screened) -> Screened:
        """A block's result with its texts and signatures moved to the batch's stores."""
        documents = result.documents
        fingerprints = documents.fingerprints
        if fingerprints is not None and isinstance(fingerprints.signatures, np.ndarray):
            if self.signatures is None:
                self.signatures = SignatureStore(fingerprints.signatures.shape[1])
            self.signatures.append(fingerprints.signatures)
            documents = replace(documents, fingerprints=fingerprints.without_signatures())
        frame = moved(result.frame, result.texts, self.store)
        return Screened(frame, documents.moved(self.store), self.store)


def concat(results: Sequence[Screened], stores: BatchOnDisk) -> Screened:
    """Block results (whose texts and signatures are in `stores` already: BatchOnDisk.stored) as one,
    row order kept, index 0..n-1 (as one read_files call makes it); the results are used up (their
    frames emptied). Empty blocks' frames are left out, so their column types never widen the others'."""
    documents = Documents.concat([result.documents for result in results], stores.signatures)
    full = [result.frame for result in results if len(result.frame)]
    if not full:
        return Screened(results[0].frame, documents, stores.store)
    if len(full) == 1:
        return Screened(full[0], documents, stores.store)
    return Screened(_joined(full), documents, stores.store)


def _joined(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The frames one after the other (index 0..n-1), as pd.concat makes them, a column at a time, each
    block's column dropped from its frame once joined: the batch's frame is never held twice (pd.concat
    of the whole frames would, about 0.25 GB a million records). The frames are left without columns."""
    names = list(frames[0].columns)
    assert all(list(frame.columns) == names for frame in frames), "blocks disagree on their columns"
    columns: dict[str, pd.Series] = {}
    for name in names:
        parts = [frame[name] for frame in frames]
        if all(isinstance(part.dtype, pd.CategoricalDtype) for part in parts):
            # pd.concat makes blocks' categoricals of different categories (each block its own
            # sources) an object column, a pointer a record: one categorical of all their categories,
            # sorted, as records.labels makes them over all the records at once.
            columns[name] = pd.Series(union_categoricals(parts, sort_categories=True), copy=False)
        else:
            columns[name] = pd.concat(parts, ignore_index=True)
        del parts
        for frame in frames:
            del frame[name]
    return pd.DataFrame(columns, copy=False)
