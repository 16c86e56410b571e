"""tuneline as a user installs it: `pip install .` (not editable) into a fresh venv, then run from a
project folder that holds configs/ and data/.

The venv gets the package only (`--no-deps --no-build-isolation`, a copy of the sources so that the
build leaves nothing in the checkout); its dependencies come from the test environment through
PYTHONPATH, which does not run the editable install's .pth hook, so `import tuneline` finds the fresh,
non-editable copy (checked first). The demo data is written by the installed `tuneline demo-data`
(the generator's content files are package data), and `tuneline prepare` runs on it.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
DEV_SITE_PACKAGES = next(p for p in site.getsitepackages() if p.endswith("site-packages"))


def run(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(the venv, the environment to run it with) after a non-editable install of this checkout."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPOSITORY / name, source / name)
    # Symbolic links (tuneline/flows, tuneline/tasks) are copied as the folders they point at.
    shutil.copytree(
        REPOSITORY / "tuneline",
        source / "tuneline",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNELINE_", "PYTHON", "VIRTUAL_ENV"))}
    env |= {
        "PYTHONPATH": DEV_SITE_PACKAGES,
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    (root / "prefect-home").mkdir()
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet"]
    done = run([*pip, str(source)], cwd=root, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return venv, env


def test_the_install_holds_one_package_and_is_the_one_imported(
    installed: tuple[Path, dict[str, str]],
) -> None:
    venv, env = installed
    [site_packages] = list((venv / "lib").glob("python3*/site-packages"))
    packages = {p.name for p in site_packages.iterdir() if p.is_dir() and not p.name.endswith(".dist-info")}
    # No generic top-level `flows` or `tasks` beside other projects' packages: they live in tuneline.
    assert packages == {"tuneline"}, packages
    assert (site_packages / "tuneline" / "flows" / "prepare.py").is_file()
    assert (site_packages / "tuneline" / "tasks" / "ingest.py").is_file()
    assert (site_packages / "tuneline" / "demo" / "content" / "dirt.yaml").is_file()
    probe = (
        "import importlib.util, tuneline; print(tuneline.__file__); "
        "print(importlib.util.find_spec('tasks'), importlib.util.find_spec('flows'))"
    )
    done = run([str(venv / "bin" / "python"), "-c", probe], cwd=venv, env=env)
    assert done.returncode == 0, done.stderr
    where, others = done.stdout.splitlines()
    assert Path(where).is_relative_to(site_packages), where
    assert others == "None None"


def test_an_installed_tuneline_prepares_the_project_it_runs_in(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    venv, env = installed
    tuneline = str(venv / "bin" / "tuneline")
    project = tmp_path / "acme"
    (project / "configs").mkdir(parents=True)
    shutil.copy2(REPOSITORY / "configs" / "local.yaml", project / "configs" / "local.yaml")

    made = run([tuneline, "demo-data"], cwd=project, env=env)
    assert made.returncode == 0, made.stdout + made.stderr
    assert (project / "data" / "planted_defects.json").read_bytes() == (
        REPOSITORY / "data" / "planted_defects.json"
    ).read_bytes()

    # Today is past the demo data: one line, the newest partition and the fix, before any work.
    early = run([tuneline, "prepare", "--out", "out"], cwd=project, env=env)
    assert early.returncode == 2, early.stdout + early.stderr
    assert "newest partition found is 2026-11-22: pass --as-of 2026-11-22" in early.stderr
    assert "Traceback" not in early.stderr

    done = run(
        [tuneline, "prepare", "--out", "out", "--as-of", "2026-11-22"], cwd=project, env=env, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = json.loads((project / "out" / "manifest.json").read_text())
    assert manifest["counts"]["input_records"] > 600 and manifest["counts"]["quarantined"] > 0
    assert (project / "out" / "train.jsonl").stat().st_size > 0
    # The store is the project's, not the installed package's folder.
    assert (project / ".tuneline" / "mlflow.db").is_file()
    assert not list(venv.rglob(".tuneline"))
    assert f"files in {project / 'out'}" in done.stdout

    # --project names the project from anywhere.
    elsewhere = run(
        [tuneline, "--project", str(project), "prepare", "--out", str(tmp_path / "o")], cwd=tmp_path, env=env
    )
    assert elsewhere.returncode == 2 and "--as-of 2026-11-22" in elsewhere.stderr, elsewhere.stderr
