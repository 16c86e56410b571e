from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from tuneline import jsonl, records
from tuneline.formats import MAX_JSON_DEPTH
from tuneline.paths import project_root


@pytest.fixture
def memory_dir() -> Iterator[str]:
    fs = fsspec.filesystem("memory")
    root = f"/jsonl-{uuid.uuid4().hex}"
    yield root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_lines_are_numbered_as_in_the_file_and_every_one_is_kept(memory_dir: str) -> None:
    body = (
        b"\xef\xbb\xbf"
        + json.dumps({"a": 1}).encode()
        + b"\r\n\n   \n{broken\n"
        + b'{"x": "caf\xe9"}\n'
        + b'{"n": NaN}\n'
        + b"[1, 2]"  # the last line needs no newline
    )
    fsspec.filesystem("memory").pipe(f"{memory_dir}/set.jsonl", body)
    lines = list(jsonl.read_lines(f"memory://{memory_dir}/set.jsonl"))
    assert [line.number for line in lines] == [1, 4, 5, 6, 7]
    assert lines[0] == jsonl.JsonLine(1, '{"a": 1}', {"a": 1}, None, None)  # BOM and \r dropped
    assert lines[1].reason == records.INVALID_JSON and lines[1].text == "{broken"
    assert "not valid JSON" in (lines[1].detail or "")
    assert lines[2].reason == records.INVALID_ENCODING and lines[2].text == '{"x": "caf\\xe9"}'
    assert lines[3].reason == records.INVALID_JSON  # NaN is not JSON
    assert lines[4].value == [1, 2]
    found = jsonl.read_set(f"memory://{memory_dir}/set.jsonl")
    assert found.values == [{"a": 1}, [1, 2]] and [p.number for p in found.problems] == [4, 5, 6]


def test_compressed_and_cut_short_files(memory_dir: str) -> None:
    body = "".join(json.dumps({"q": f"question {i} " + "x" * 200}) + "\n" for i in range(300)).encode()
    packed = gzip.compress(body)
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{memory_dir}/whole.jsonl.gz", packed)
    fs.pipe(f"{memory_dir}/cut.jsonl.gz", packed[: len(packed) // 2])
    assert len(jsonl.read_set(f"memory://{memory_dir}/whole.jsonl.gz").values) == 300
    *good, last = jsonl.read_lines(f"memory://{memory_dir}/cut.jsonl.gz")
    assert len(good) > 10 and all(line.reason is None for line in good)
    assert last.reason == records.INVALID_ENCODING and last.number == len(good) + 1
    assert f"after line {len(good)}" in (last.detail or "")


def test_json_nested_beyond_the_bound_is_refused_with_its_line(memory_dir: str) -> None:
    # 300 levels parse with orjson but cannot be written back by it (255 at most): such a line once
    # passed ingest and broke export. The server refuses the same depth in an uploaded file.
    deep = {"messages": [{"role": "user", "content": "hi", "name": [[[]]]}]}
    nested: object = []
    for _ in range(300):
        nested = [nested]
    deep["messages"][0]["name"] = nested
    shallow = {"a": [[[[[[1]]]]]], "b": "[" * 200}  # brackets inside a string do not nest
    body = json.dumps(shallow).encode() + b"\n" + json.dumps(deep).encode() + b"\n"
    fsspec.filesystem("memory").pipe(f"{memory_dir}/deep.jsonl", body)
    lines = list(jsonl.read_lines(f"memory://{memory_dir}/deep.jsonl"))
    assert lines[0].reason is None and lines[0].value == shallow
    assert lines[1].number == 2 and lines[1].reason == records.INVALID_JSON and lines[1].value is None
    assert f"deeper than {MAX_JSON_DEPTH} levels" in (lines[1].detail or "")
    assert lines[1].text == json.dumps(deep)  # kept, never lost


def test_paths_are_taken_from_the_project_root_and_urls_as_they_are(tmp_path: Path) -> None:
    assert jsonl.location("data/eval/support_eval.jsonl") == str(
        project_root() / "data/eval/support_eval.jsonl"
    )
    assert jsonl.location("s3://bucket/eval.jsonl") == "s3://bucket/eval.jsonl"
    assert jsonl.exists("data/eval/support_eval.jsonl")
    assert not jsonl.exists("data/eval/no-such-file.jsonl")
    assert not jsonl.exists(str(tmp_path))  # a folder is not a file
    assert jsonl.name_of("memory://a/b/eval.jsonl") == "eval.jsonl"
    with pytest.raises(FileNotFoundError):
        list(jsonl.read_lines(str(tmp_path / "missing.jsonl")))
