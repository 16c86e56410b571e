"""The pruned OpenAPI contract kept in the project: complete for what the server speaks, carrying its
licence and provenance, and exactly what prune.py makes of it (so it can be refreshed, not hand-edited)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import yaml

OPENAPI = Path(__file__).resolve().parent / "openapi"


def prune_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prune", OPENAPI / "prune.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_copy_is_what_prune_makes_of_it_and_holds_every_root(tmp_path: Path) -> None:
    prune = prune_script()
    copy = OPENAPI / "openai-openapi.yaml"
    again = tmp_path / "again.yaml"
    assert prune.main(["prune.py", str(copy), str(again)]) == 0
    assert again.read_text(encoding="utf-8") == copy.read_text(encoding="utf-8")
    schemas = yaml.safe_load(copy.read_text(encoding="utf-8"))["components"]["schemas"]
    assert set(prune.ROOTS) <= set(schemas)
    assert all(prune._references(schema) <= set(schemas) for schema in schemas.values())


def test_the_copy_carries_the_upstream_licence_and_provenance() -> None:
    licence = (OPENAPI / "LICENSE-openai-openapi.txt").read_text(encoding="utf-8")
    assert "The MIT License" in licence and "Copyright (c) OpenAI" in licence
    readme = (OPENAPI / "README.md").read_text(encoding="utf-8")
    assert "openai/openai-openapi" in readme and "f85dbe2" in readme
    assert "LICENSE-openai-openapi.txt" in (OPENAPI / "openai-openapi.yaml").read_text(encoding="utf-8")
