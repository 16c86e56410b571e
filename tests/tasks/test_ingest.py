from __future__ import annotations

import gzip
import io
import json
import re
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tuneline import records
from tuneline.config import CsvMapping, Source
from tuneline.tasks import ingest

AS_OF = date(2025, 3, 10)
SYSTEM = "You are the Acme support assistant."


def chat_line(question: str, answer: str = "Billing: done.") -> str:
    return json.dumps(
        {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    )


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh folder on fsspec's in-memory filesystem, removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/ingest-{uuid.uuid4().hex}"
    yield root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def put(path: str, data: bytes | str) -> None:
    fsspec.filesystem("memory").pipe(path, data.encode() if isinstance(data, str) else data)


def read(
    uri: str, *sources: Source, lookback: int = 7, fallbacks: tuple[CsvMapping, ...] = ()
) -> ingest.pd.DataFrame:
    chosen = list(sources) or [Source(name="s", uri=uri)]
    return ingest.ingest(
        chosen, as_of=AS_OF, lookback_days=lookback, system_prompt=SYSTEM, csv_fallbacks=fallbacks
    )


def test_memory_url_partitions_and_date_window(memory_root: str) -> None:
    for day in ("2025-03-03", "2025-03-04", "2025-03-10", "2025-03-11"):
        put(f"{memory_root}/dt={day}/part-0.jsonl", chat_line(f"question of {day}") + "\n")
    put(f"{memory_root}/extra.jsonl", chat_line("unpartitioned") + "\n")
    selection = ingest.select_files([Source(name="s", uri=f"memory://{memory_root}")], AS_OF, 7)
    # (as_of - 7, as_of]: 03-03 is out, 03-04 and 03-10 are in, 03-11 is in the future.
    assert selection.partitions == ["2025-03-04", "2025-03-10"]
    assert selection.outside_window == 2
    frame = read(f"memory://{memory_root}")
    assert frame[records.PARTITION].tolist() == ["", "2025-03-04", "2025-03-10"]
    assert all(s.startswith("memory://") for s in frame[records.SOURCE])
    assert frame[records.REASON].isna().all()
    assert frame[records.EXAMPLE].iloc[0]["messages"][0]["content"] == "unpartitioned"


def test_a_file_named_exactly_is_read_whatever_its_partition(memory_root: str) -> None:
    put(f"{memory_root}/dt=2020-01-01/old.jsonl", chat_line("old") + "\n")
    frame = read(f"memory://{memory_root}/dt=2020-01-01/old.jsonl")
    assert len(frame) == 1 and frame[records.PARTITION].iloc[0] == "2020-01-01"
    assert read(f"memory://{memory_root}/dt=*/*.jsonl").empty  # a glob honours the window


def test_unreadable_lines_are_quarantined_never_lost(memory_root: str) -> None:
    body = b"\xef\xbb\xbf" + "\n".join([chat_line("ok"), "", "{broken", "\r"]).encode() + b"\n"
    body += b'{"messages": "caf\xe9"}\r\n' + b"[1, 2]\n" + b'{"n": NaN}\n'
    put(f"{memory_root}/dt=2025-03-09/a.jsonl", body)
    frame = read(f"memory://{memory_root}")
    assert frame[records.LINE].tolist() == [
        1,
        3,
        5,
        6,
        7,
    ]  # blank lines hold no record; numbering is the file's
    assert frame[records.REASON].tolist() == [None, "invalid_json", "invalid_encoding", None, "invalid_json"]
    assert frame[records.RAW].tolist()[1] == "{broken"
    assert frame[records.RAW].tolist()[2] == '{"messages": "caf\\xe9"}'  # decoded with backslashreplace
    assert "not UTF-8" in frame[records.DETAIL].tolist()[2]
    assert "not valid JSON" in frame[records.DETAIL].tolist()[1]
    assert frame[records.EXAMPLE].tolist()[3] == [1, 2]  # valid JSON, not an object: validate's business
    assert frame[records.RECORD_ID].is_unique


def test_record_ids_are_stable_and_rows_sorted(memory_root: str) -> None:
    put(f"{memory_root}/dt=2025-03-09/b.jsonl", "\n".join(chat_line(f"b{i}") for i in range(3)))
    put(f"{memory_root}/dt=2025-03-08/z.jsonl", chat_line("z"))
    put(f"{memory_root}/dt=2025-03-09/a.jsonl", chat_line("a"))
    first = read(f"memory://{memory_root}")
    second = read(f"memory://{memory_root}")
    assert first[records.RECORD_ID].tolist() == second[records.RECORD_ID].tolist()
    keys = list(zip(first[records.PARTITION], first[records.SOURCE], first[records.LINE], strict=True))
    assert keys == sorted(keys)
    expected = records.make_record_id(first[records.SOURCE].iloc[0], "2025-03-08", 1, chat_line("z"))
    assert first[records.RECORD_ID].iloc[0] == expected


def test_csv_chat_mapping_uses_the_configured_system_prompt(memory_root: str) -> None:
    put(
        f"{memory_root}/crm.csv",
        'customer_message,agent_reply\nWhere is it?,"Shipping: on its way, today."\n',
    )
    mapping = CsvMapping(user="customer_message", assistant="agent_reply")
    frame = read("", Source(name="crm", uri=f"memory://{memory_root}/crm.csv", csv_mapping=mapping))
    assert frame[records.EXAMPLE].iloc[0] == {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Where is it?"},
            {"role": "assistant", "content": "Shipping: on its way, today."},
        ]
    }
    assert json.loads(frame[records.RAW].iloc[0]) == {
        "customer_message": "Where is it?",
        "agent_reply": "Shipping: on its way, today.",
    }
    assert frame[records.LINE].iloc[0] == 1  # rows, header not counted


def test_csv_system_column_and_legacy_mapping(memory_root: str) -> None:
    put(f"{memory_root}/a.csv", "sys,q,a\nBe terse.,hi,hello\n,hey,yo\n")
    put(f"{memory_root}/b.csv", "question,answer\nq1,a1\n")
    chat = CsvMapping(user="q", assistant="a", system="sys")
    legacy = CsvMapping(prompt="question", completion="answer")
    frame = read(
        "",
        Source(name="a", uri=f"memory://{memory_root}/a.csv", csv_mapping=chat),
        Source(name="b", uri=f"memory://{memory_root}/b.csv", csv_mapping=legacy),
    )
    examples = frame[records.EXAMPLE].tolist()
    assert examples[0]["messages"][0] == {"role": "system", "content": "Be terse."}
    assert examples[1]["messages"][0] == {"role": "system", "content": SYSTEM}  # empty cell: the config's
    assert examples[2] == {"prompt": "q1", "completion": "a1"}


def test_csv_problems_quarantine_rows(memory_root: str) -> None:
    put(f"{memory_root}/missing.csv", "customer,reply\nx,y\nz,w\n")
    put(
        f"{memory_root}/ragged.csv",
        b'user,assistant\nonly one field\nfine,ok\nbad \xff byte,ok\n"quoted", then,shifted\n',
    )
    mapping = CsvMapping(user="customer_message", assistant="agent_reply")
    frame = read(
        "",
        Source(name="crm", uri=f"memory://{memory_root}/missing.csv", csv_mapping=mapping),
        Source(name="plain", uri=f"memory://{memory_root}/ragged.csv"),
    )
    reasons = dict(
        zip(
            zip(frame[records.SOURCE].str.rsplit("/", n=1).str[1], frame[records.LINE], strict=True),
            frame[records.REASON],
            strict=True,
        )
    )
    assert reasons == {
        ("missing.csv", 1): "csv_mapping",
        ("missing.csv", 2): "csv_mapping",
        ("ragged.csv", 1): "csv_mapping",
        ("ragged.csv", 2): None,  # user/assistant columns need no mapping
        ("ragged.csv", 3): "invalid_encoding",
        ("ragged.csv", 4): "csv_mapping",  # more fields than the header: its values are shifted
    }
    details = frame[records.DETAIL].tolist()
    assert "customer_message" in details[0] and "data.sources[crm].csv_mapping" in details[0]
    assert "\\xff" in frame[records.RAW].tolist()[4]
    assert (
        "row has 3 fields, the header has 2" in details[5]
        and "__extra_fields__" in frame[records.RAW].iloc[5]
    )


def test_csv_without_mapping_borrows_a_configured_one(memory_root: str) -> None:
    put(f"{memory_root}/crm.csv", "customer_message,agent_reply\nq,a\n")
    put(f"{memory_root}/other.csv", "col1,col2\nq,a\n")
    fallback = CsvMapping(user="customer_message", assistant="agent_reply")
    frame = read(f"memory://{memory_root}/*.csv", fallbacks=(fallback,))
    assert frame[records.REASON].tolist() == [None, "csv_mapping"]
    assert "no column mapping fits" in frame[records.DETAIL].tolist()[1]


def test_parquet_mapped_and_nested(memory_root: str) -> None:
    flat = pa.table({"customer_message": ["Refund?"], "agent_reply": ["Billing: refunded."]})
    nested = pa.table(
        {
            "messages": [
                [
                    {"role": "user", "content": "hi", "weight": None},
                    {"role": "assistant", "content": "hey", "weight": 1},
                ],
            ]
        }
    )
    for name, table in (("flat.parquet", flat), ("nested.parquet", nested)):
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        put(f"{memory_root}/{name}", buffer.getvalue())
    put(f"{memory_root}/broken.parquet", b"PAR1 not really")
    mapping = CsvMapping(user="customer_message", assistant="agent_reply")
    frame = read(f"memory://{memory_root}", fallbacks=(mapping,))
    by_name = {
        s.rsplit("/", 1)[1]: row for s, row in zip(frame[records.SOURCE], frame.itertuples(), strict=True)
    }
    assert by_name["broken.parquet"].reason == "invalid_encoding" and by_name["broken.parquet"].line == 0
    assert by_name["flat.parquet"].example["messages"][-1] == {
        "role": "assistant",
        "content": "Billing: refunded.",
    }
    # A null struct field is an absent key, not "weight": null.
    assert by_name["nested.parquet"].example == {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey", "weight": 1}]
    }


def test_folders_globs_compression_and_skipped_files(memory_root: str) -> None:
    put(f"{memory_root}/d/a.jsonl.gz", gzip.compress((chat_line("zipped") + "\n").encode()))
    put(f"{memory_root}/d/.hidden.jsonl", chat_line("hidden"))
    put(f"{memory_root}/d/_SUCCESS", "")
    put(f"{memory_root}/d/notes.txt", "not data")
    selection = ingest.select_files([Source(name="s", uri=f"memory://{memory_root}/d")], AS_OF, 7)
    assert [f.display.rsplit("/", 1)[1] for f in selection.files] == ["a.jsonl.gz"]
    assert selection.unknown_format == [f"memory://{memory_root}/d/notes.txt"]
    frame = read(f"memory://{memory_root}/d")
    assert frame[records.EXAMPLE].iloc[0]["messages"][0]["content"] == "zipped"
    # Two sources naming one file read it once; a source naming nothing is reported.
    twice = ingest.select_files(
        [
            Source(name="one", uri=f"memory://{memory_root}/d/*.gz"),
            Source(name="two", uri=f"memory://{memory_root}/d"),
            Source(name="none", uri=f"memory://{memory_root}/nothing/*.jsonl"),
        ],
        AS_OF,
        7,
    )
    assert [f.source_name for f in twice.files] == ["one"]
    assert twice.empty_sources == ["none"]


def test_local_paths_and_project_relative_sources(tmp_path: Path) -> None:
    folder = tmp_path / "dt=2025-03-10"
    folder.mkdir()
    (folder / "part.jsonl").write_text(chat_line("local") + "\n")
    frame = read(str(tmp_path / "dt=*" / "*.jsonl"))
    assert frame[records.SOURCE].tolist() == [(folder / "part.jsonl").as_posix()]
    assert frame[records.PARTITION].tolist() == ["2025-03-10"]
    # A relative path is taken from the project root and shown relative to it.
    selection = ingest.select_files([Source(name="cfg", uri="configs/local.yaml", format="jsonl")], AS_OF, 7)
    assert [f.display for f in selection.files] == ["configs/local.yaml"]


def test_no_files_gives_an_empty_frame() -> None:
    frame = ingest.read_files([], SYSTEM)
    assert list(frame.columns) == records.BASE_COLUMNS and frame.empty


def test_a_file_cut_short_keeps_the_lines_read_before(memory_root: str) -> None:
    body = "".join(chat_line(f"question {i} " + "x" * 200) + "\n" for i in range(400)).encode()
    packed = gzip.compress(body)
    put(f"{memory_root}/cut.jsonl.gz", packed[: len(packed) // 2])
    frame = read(f"memory://{memory_root}/cut.jsonl.gz")
    *good, last = frame.itertuples()
    assert len(good) > 10 and all(row.reason is None for row in good)
    assert last.reason == "invalid_encoding" and last.line == len(good) + 1
    assert f"after line {len(good)}" in last.detail


def crm_rows(n: int) -> list[str]:
    return [f"Where is parcel {i}?,Shipping: parcel {i} is on its way." for i in range(1, n + 1)]


def test_an_unclosed_quote_quarantines_every_row_it_swallowed_by_line(memory_root: str) -> None:
    rows = crm_rows(40)
    rows[1] = '"' + rows[1]  # row 2 opens a quote that is never closed
    put(f"{memory_root}/crm.csv", "user,assistant\n" + "\n".join(rows) + "\n")
    frame = read(f"memory://{memory_root}/crm.csv")
    # 40 rows in, 40 records: one kept, and each of the 39 lines the quote swallowed on its own.
    assert len(frame) == 40
    assert frame[records.REASON].tolist() == [None] + ["invalid_csv"] * 39
    assert frame[records.LINE].tolist() == list(range(1, 41))
    assert frame[records.FIRST_LINE].tolist() == frame[records.LAST_LINE].tolist() == list(range(2, 42))
    details = frame[records.DETAIL].tolist()
    assert details[1].startswith("line 3: a quote opened in the CSV row starting on line 3 is never closed")
    assert details[39].startswith("line 41: ")
    assert frame[records.RAW].tolist()[5] == rows[5]
    assert frame[records.RECORD_ID].is_unique


def test_a_quote_closed_on_the_next_line_never_makes_a_merged_example(memory_root: str) -> None:
    rows = crm_rows(6)
    rows[1] = '"' + rows[1]
    rows[2] = rows[2].replace("?,", '?",')  # closed at the end of row 3's question: rows 2-3 parse as one
    put(f"{memory_root}/crm.csv", "user,assistant\n" + "\n".join(rows) + "\n")
    frame = read(f"memory://{memory_root}/crm.csv")
    assert frame[records.REASON].tolist() == [None, "invalid_csv", "invalid_csv", None, None, None]
    assert frame[records.FIRST_LINE].tolist() == [2, 3, 4, 5, 6, 7]
    for example in frame[records.EXAMPLE].dropna():
        texts = " ".join(m["content"] for m in example["messages"])
        assert len(set(re.findall(r"parcel (\d+)", texts))) == 1, texts  # one row's words, never two


def test_a_message_with_line_breaks_is_one_record_spanning_its_lines(memory_root: str) -> None:
    put(
        f"{memory_root}/crm.csv",
        'user,assistant\nWhere is it?,"Category: shipping\nReply: on its way."\nRefund?,Billing: done.\n',
    )
    frame = read(f"memory://{memory_root}/crm.csv")
    assert frame[records.REASON].isna().all()
    assert frame[records.LINE].tolist() == [1, 2]
    assert list(zip(frame[records.FIRST_LINE], frame[records.LAST_LINE], strict=True)) == [(2, 3), (4, 4)]
    assert (
        frame[records.EXAMPLE].iloc[0]["messages"][-1]["content"] == "Category: shipping\nReply: on its way."
    )


def test_a_url_never_shows_its_credentials(memory_root: str) -> None:
    assert (
        ingest.without_credentials("https://ana:hunter2@example.com/d/x.jsonl")
        == "https://example.com/d/x.jsonl"
    )
    assert ingest.without_credentials("s3://bucket/a@b.jsonl") == "s3://bucket/a@b.jsonl"
    source = Source(name="s", uri="https://ana:hunter2@example.com/d/*.jsonl")
    selection = ingest.FileSelection([])
    assert "hunter2" not in json.dumps(selection.describe_sources([source]))
