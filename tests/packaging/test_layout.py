"""One installed name, ``elbogap``, whose layers only point down.

The wheel is built from the checkout, and every check runs on what it ships: its top-level names,
and ``lint-imports`` (import-linter, with the contracts of pyproject.toml) on the unpacked package,
which is where ``elbogap.cli``, ``elbogap.models`` and ``elbogap.guides`` sit beside the layers of
``inference/`` (in the checkout they are folders of their own, mapped by ``package-dir``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.limits import HANG_SECONDS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "inference", "models", "guides", "scripts")


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory) -> Path:
    """The wheel of the checkout, built in a copy (the checkout gets no build/ folder) and
    unpacked as pip would install it."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    # Offline where this environment has the build backend pyproject asks for (torch brings
    # it); else pip fetches it into an isolated build environment.
    offline = ["--no-build-isolation"] if _has_setuptools(77) else []
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(base / "dist"),
         *offline, str(source)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (base / "dist").glob("elbogap-*.whl")
    site = base / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def _has_setuptools(major: int) -> bool:
    if importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools

    return int(setuptools.__version__.split(".")[0]) >= major


def lint(site: Path, config: Path = PYPROJECT) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package unpacked in ``site`` (found first on the path, before the
    editable install of the checkout)."""
    lint_imports = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    return subprocess.run([lint_imports, "--no-cache", str(config)], cwd=site,
                          env={**os.environ, "PYTHONPATH": str(site)},
                          capture_output=True, text=True, timeout=HANG_SECONDS)


def test_the_wheel_ships_one_importable_name_and_no_benchmark(unpacked_wheel):
    top = {p.name for p in unpacked_wheel.iterdir()}
    assert top == {"elbogap", "elbogap-0.1.0.dist-info"}
    package = unpacked_wheel / "elbogap"
    for sub in ("foundations", "data", "presentation", "diagnostics", "training", "runs", "cli",
                "models", "guides"):
        assert (package / sub / "__init__.py").is_file(), sub
    assert not list(unpacked_wheel.rglob("*benchmark*"))
    entry_points = (unpacked_wheel / "elbogap-0.1.0.dist-info" / "entry_points.txt").read_text()
    assert "elbogap = elbogap.models:MODELS" in entry_points
    assert "elbogap-fit = elbogap.cli.fit:command" in entry_points


def test_the_layers_contracts_hold_on_the_shipped_package(unpacked_wheel):
    result = lint(unpacked_wheel)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "Contracts: 4 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("module, line, broken", [
    # An upward import: a foundation reaching for a run directory.
    ("foundations/statistics.py", "from ..runs import run_directory",
     r"elbogap\.foundations\.statistics -> elbogap\.runs\.run_directory"),
    # The same, hidden inside a function, as lazy imports used to hide circles.
    ("data/dataset.py", "def _hidden():\n    from ..training import fitting\n",
     r"elbogap\.data\.dataset -> elbogap\.training\.fitting"),
    # Siblings in one layer: data and presentation are independent of each other.
    ("presentation/html.py", "from ..data import dataset",
     r"elbogap\.presentation\.html -> elbogap\.data\.dataset"),
    # The estimators knowing the project's own VAE.
    ("diagnostics/kl.py", "from ..models import vae",
     r"elbogap\.diagnostics\.kl -> elbogap\.models\.vae"),
    # An import circle inside a layer.
    ("diagnostics/kl.py", "from .evaluation import evaluate",
     r"No cycles are allowed in elbogap\.diagnostics\.[^-]*- \.kl -> \.evaluation"),
])
def test_an_import_against_the_layers_is_caught(unpacked_wheel, tmp_path, module, line, broken):
    site = tmp_path / "site"
    shutil.copytree(unpacked_wheel / "elbogap", site / "elbogap")
    path = site / "elbogap" / module
    path.write_text(path.read_text() + "\n" + line + "\n")
    result = lint(site)
    assert result.returncode != 0
    assert re.search(broken, result.stdout), result.stdout[-4000:]


def test_each_layer_rule_is_load_bearing(unpacked_wheel, tmp_path):
    """Without the order of two layers the real code breaks the contract: training evaluates
    every epoch (elbogap.training.fitting imports elbogap.diagnostics.evaluation), and a
    Diagnostics shows itself as a table (elbogap.diagnostics.results imports
    elbogap.presentation.table)."""
    layers = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    assert layers == ["cli", "runs", "training", "diagnostics", "presentation | data",
                      "foundations"]
    for swapped, broken in (
            (["cli", "runs", "diagnostics", "training", "presentation | data", "foundations"],
             r"elbogap\.training is not allowed to import elbogap\.diagnostics"),
            (["cli", "runs", "training", "presentation", "diagnostics", "data", "foundations"],
             r"elbogap\.diagnostics is not allowed to import elbogap\.presentation")):
        text = PYPROJECT.read_text().replace(
            'layers = ["cli", "runs", "training", "diagnostics", "presentation | data", '
            '"foundations"]', "layers = [" + ", ".join(f'"{x}"' for x in swapped) + "]")
        config = tmp_path / "pyproject.toml"
        config.write_text(text)
        result = lint(unpacked_wheel, config)
        assert result.returncode != 0 and re.search(broken, result.stdout), result.stdout[-3000:]


USER_MODELS = "MARK = 'the user\\'s own models package'\n"
USER_INFERENCE = "MARK = 'the user\\'s own inference module'\n"
LOAD = """
import json, sys
from elbogap import evaluate, load_run
import models, inference
run = load_run(sys.argv[1])
d = evaluate(run.model, run.guide, run.data.test[:20], num_samples=10)
print(json.dumps([models.MARK, inference.MARK, d.summary()["num_data"]]))
"""


def test_a_project_folder_with_its_own_models_and_inference_keeps_them(tmp_path):
    """Started from a folder holding models.py, models/, inference.py and an inference/ output
    folder (as ML projects do), elbogap and the user's modules each get their own; every
    console command works there."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text(USER_MODELS)
    (tmp_path / "models.py").write_text(USER_MODELS)
    (tmp_path / "inference.py").write_text(USER_INFERENCE)
    (tmp_path / "inference").mkdir()  # an output folder, not a package
    (tmp_path / "inference" / "predictions.csv").write_text("0\n")
    bin_dir = Path(sys.executable).parent

    def command(name, *args):
        result = subprocess.run([str(bin_dir / name), *args], cwd=tmp_path, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
        return result

    fast = ["--epochs", "2", "--num-samples", "20", "--eval-samples", "5", "--eval-points", "20",
            "--test-points", "30", "--no-progress"]
    command("elbogap-fit", *fast, "--out", "runs/a")
    command("elbogap-fit", *fast, "--seed", "1", "--out", "runs/b")
    command("elbogap-evaluate", "runs/a", "-K", "10", "--max-points", "10", "--no-progress")
    command("elbogap-report", "runs/a", "-K", "10", "--max-points", "20", "--amortization-points",
            "0", "--ais-points", "0", "--idata-points", "2", "--idata-draws", "5", "--no-progress")
    command("elbogap-compare", "runs/a", "runs/b", "-K", "10", "--points", "10", "--out", "cmp")
    command("elbogap-kl-directions", "--steps", "20", "--replicates", "20", "--out", "kl")
    result = subprocess.run([sys.executable, "-c", LOAD, "runs/a"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=HANG_SECONDS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == (
        '["the user\'s own models package", "the user\'s own inference module", 20]')
