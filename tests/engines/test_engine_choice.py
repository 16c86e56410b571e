"""The execution section and the local engine without Ray: these run whether or not the ray extra is
installed (Ray is hidden from the interpreter with sys.modules["ray"] = None)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tuneline.config import ConfigError, load_config
from tuneline.engines import ray_engine

ROOT = Path(__file__).resolve().parents[2]


def test_the_local_engine_is_the_default_and_imports_without_ray() -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from tuneline.config import load_config\n"
        "import tuneline.flows.prepare, tuneline.flows.backfill, tuneline.engines.ray_engine\n"
        "from tuneline.engines import ray_available\n"
        "print(load_config().execution.engine, ray_available())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["local", "False"]


def test_the_ray_engine_without_ray_is_one_line_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    config = load_config(overrides={"execution.engine": "ray"})
    with pytest.raises(ConfigError, match=r"^execution\.engine: ray needs the Ray extra .*tuneline\[ray\]"):
        ray_engine.connect(config.execution)


def test_execution_is_checked_and_left_out_of_the_config_hash() -> None:
    with pytest.raises(ConfigError, match=r"execution\.engine: .*'local' or 'ray'"):
        load_config(overrides={"execution.engine": "dask"})
    on_ray = load_config(overrides={"execution.engine": "ray", "execution.address": "auto"})
    assert on_ray.config_hash() == load_config().config_hash()
