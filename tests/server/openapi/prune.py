"""Prune OpenAI's OpenAPI description down to the schemas `tuneline serve` speaks.

    python tests/server/openapi/prune.py SPEC [OUT]

SPEC is the upstream openai-openapi.yaml (openai/openai-openapi), OUT defaults to
tests/server/openapi/openai-openapi.yaml. The output keeps `components.schemas` for ROOTS and every
schema they reference, as published (descriptions, examples and vendor `x-` keys dropped: the
contract tests validate shapes, not prose); the tests read only that copy, so they run on any clone.
Pruning the output again gives the same schemas.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "openai-openapi.yaml"
# The request and response bodies of the routes the server answers (tuneline/server/protocol.py).
ROOTS = (
    "CreateFileRequest",
    "OpenAIFile",
    "ListFilesResponse",
    "DeleteFileResponse",
    "CreateFineTuningJobRequest",
    "FineTuningJob",
    "ListPaginatedFineTuningJobsResponse",
    "FineTuningJobEvent",
    "ListFineTuningJobEventsResponse",
    "FineTuningJobCheckpoint",
    "ListFineTuningJobCheckpointsResponse",
    "Model",
    "ListModelsResponse",
    "DeleteModelResponse",
    "CreateChatCompletionRequest",
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "ErrorResponse",
    "RunGraderRequest",
    "RunGraderResponse",
    "ValidateGraderRequest",
    "ValidateGraderResponse",
)
DROPPED_KEYS = frozenset({"description", "example", "examples", "title"})
# Keywords whose value maps names (of fields, definitions) to schemas.
NAME_MAPS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "mapping"}
)
REF_PREFIX = "#/components/schemas/"
HEADER = """\
# Pruned from openai/openai-openapi (MIT licence: LICENSE-openai-openapi.txt beside this file) by
# prune.py; provenance in README.md. Do not edit by hand: run prune.py again.
"""


def _strip(node: Any, names: bool = False) -> Any:
    """`node` without prose and vendor keys; `names`: node maps names to schemas (`properties`...),
    so its keys are kept whatever they are called."""
    if isinstance(node, list):
        return [_strip(item) for item in node]
    if not isinstance(node, dict):
        return node
    if names:
        return {key: _strip(value) for key, value in node.items()}
    return {
        key: _strip(value, names=key in NAME_MAPS)
        for key, value in node.items()
        if not (key in DROPPED_KEYS or key.startswith("x-"))
    }


def _references(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, list):
        for item in node:
            found |= _references(item)
    elif isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(REF_PREFIX):
            found.add(ref[len(REF_PREFIX) :])
        for value in node.values():
            found |= _references(value)
    return found


def prune(spec: dict[str, Any], roots: tuple[str, ...] = ROOTS) -> dict[str, Any]:
    """`{"components": {"schemas": ...}}` with the roots and every schema they reach."""
    schemas = spec["components"]["schemas"]
    missing = [name for name in roots if name not in schemas]
    if missing:
        raise KeyError(f"the spec has no schemas {missing}")
    kept: dict[str, Any] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in kept:
            continue
        kept[name] = _strip(schemas[name])
        todo.extend(sorted(_references(kept[name]) - kept.keys()))
    return {"components": {"schemas": dict(sorted(kept.items()))}}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: prune.py SPEC [OUT]  (SPEC: the upstream openai-openapi.yaml)", file=sys.stderr)
        return 2
    spec_path = Path(argv[1])
    out_path = Path(argv[2]) if len(argv) > 2 else DEFAULT_OUT
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    spec = yaml.load(spec_path.read_text(encoding="utf-8"), Loader=loader)
    pruned = prune(spec)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    text = yaml.dump(pruned, Dumper=dumper, sort_keys=False, allow_unicode=True, width=110)
    out_path.write_text(HEADER + text, encoding="utf-8")
    print(f"{len(pruned['components']['schemas'])} schemas from {spec_path} -> {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
