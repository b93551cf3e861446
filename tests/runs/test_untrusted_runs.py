"""A run directory from someone else runs no code without the user's word: a config that names a
module or a file is refused by every entry point before anything is imported, and with
``--trust-code`` the file runs from the bytes checked, never through a planted ``.pyc``; nothing
in a run directory is written through a link planted there."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from elbogap import ConfigError, compare, load_run
from elbogap.cli.compare import command as compare_command
from elbogap.cli.evaluate import command as evaluate
from elbogap.cli.fit import command as fit
from elbogap.cli.report import command as report
from elbogap.runs.ownership import release
from elbogap.runs.run_directory import new_run, train
from tests.limits import HANG_SECONDS
from tests.pairs import LINEAR_PAIR_FILE

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"data": "synthetic", "model": "linear-gaussian", "guide": "mean-field",
            "batch_size": 100, "epochs": 1, "eval_every": 1, "eval_samples": 5,
            "num_samples": 10, "progress": False}
FAST = ["-K", "5", "--no-progress"]

# What an attacker's module or file does when it is imported: leave a marker.
PAYLOAD = "import pathlib\npathlib.Path({marker!r}).touch()\n"
# A factory of a working pair (so that, trusted, the run loads to its end).
FACTORY = LINEAR_PAIR_FILE


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trusted") / "run"
    run, options = new_run(SETTINGS, out)
    train(run, options)
    run.release()
    return out


def crafted(fitted: Path, where: Path, **config) -> Path:
    """A copy of the fitted run whose config says ``config``."""
    run = where / "crafted"
    shutil.copytree(fitted, run)
    held = json.loads((run / "config.json").read_text())
    held.update(config)
    (run / "config.json").write_text(json.dumps(held))
    return run


def entry_points(run: Path, other: Path) -> dict[str, tuple]:
    """Every command that loads a run, as a user would call it (in this process: the code of
    the installed commands)."""
    return {
        "evaluate": (evaluate, [str(run), *FAST]),
        "report": (report, [str(run), "-K", "5", "--ais-points", "0", "--amortization-points",
                            "0", "--idata-points", "1", "--no-progress"]),
        "compare": (compare_command, [str(run), str(other), "-K", "5", "--points", "5",
                                      "--out", str(run.parent / "cmp")]),
        "resume": (fit, ["--resume", str(run), "--epochs", "2", "--no-progress"]),
    }


def refused_by_every_entry_point(run: Path, other: Path, marker: Path, capsys) -> None:
    capsys.readouterr()
    for name, (command_of, args) in entry_points(run, other).items():
        assert command_of(args) == 2, name
        err = capsys.readouterr().err
        assert "Traceback" not in err, name
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and "is code" in last and "--trust-code" in last, last
        assert not marker.exists(), name
        release(run)


def command(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A real ``python`` process, for what only one shows (``-m`` puts its working directory on
    the import path)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=HANG_SECONDS)


def assert_refused(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(e in last for e in expected), last


def test_a_config_naming_an_importable_module_runs_nothing_without_consent(fitted, tmp_path,
                                                                            capsys):
    package = tmp_path / "shared"
    package.mkdir()
    (package / "__init__.py").write_text("")
    marker = tmp_path / "module-ran"
    (package / "evil.py").write_text(PAYLOAD.format(marker=str(marker)) + FACTORY)
    run = crafted(fitted, tmp_path, model="shared.evil:make", guide="the factory's",
                  latent_dim=None, hidden_dims=None, likelihood="the model's")
    other = tmp_path / "other"
    shutil.copytree(fitted, other)
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ConfigError, match=r"its model shared\.evil:make is code: loading the "
                                              r"run would import the module shared\.evil.*"
                                              r"trust_code=True \(--trust-code\)"):
            load_run(run)
        with pytest.raises(ConfigError, match="is code"):
            compare([run, other], num_samples=5, points=5)
        assert not marker.exists()
        # The module is on the path: every command refuses it before importing it, and so does
        # python -m, whose working directory (here, the module's) is on the path too.
        refused_by_every_entry_point(run, other, marker, capsys)
        assert_refused(command(["-m", "elbogap.cli.evaluate", str(run), *FAST], cwd=tmp_path),
                       "is code", "--trust-code")
        assert not marker.exists()
        # "this:x" imports Python's easter egg, which prints: nothing is printed now.
        this = crafted(fitted, tmp_path / "this", model="this:x")
        result = command(["-m", "elbogap.cli.evaluate", str(this), *FAST], cwd=tmp_path)
        assert_refused(result, "this:x is code")
        assert "Beautiful is better than ugly" not in result.stdout + result.stderr
        # With the user's word, the module is imported (and said so).
        with pytest.raises(ConfigError):  # the fitted parameters are not this pair's
            load_run(run, trust_code=True)
        assert marker.exists()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("shared.evil", None)
        sys.modules.pop("shared", None)


@pytest.fixture
def file_run(tmp_path) -> tuple[Path, Path]:
    """A run of a model file, fitted as a user does."""
    model_file = tmp_path / "code" / "my_pair.py"
    model_file.parent.mkdir()
    model_file.write_text(FACTORY)
    out = tmp_path / "run"
    run, options = new_run({**SETTINGS, "model": f"{model_file}:make", "guide": None,
                            "latent_dim": 2}, out)
    train(run, options)
    run.release()
    return out, model_file


def test_a_crafted_run_with_its_own_file_and_checksum_needs_consent(file_run, fitted, tmp_path,
                                                                     capsys):
    out, model_file = file_run
    # The user's own run: refused without the word too, loaded with it.
    with pytest.raises(ConfigError, match="run the Python file .*my_pair.py; .*--trust-code"):
        load_run(out)
    assert load_run(out, trust_code=True).options.epochs == 1
    assert "imports and runs" in capsys.readouterr().err
    # An attacker's file, shipped inside the run directory with its own sha256.
    attack = tmp_path / "attack"
    shutil.copytree(out, attack)
    marker = tmp_path / "file-ran"
    evil = attack / "pair.py"
    evil.write_text(PAYLOAD.format(marker=str(marker)) + FACTORY)
    config = json.loads((attack / "config.json").read_text())
    config["model"] = f"{evil}:make"
    config["model_sha256"] = __import__("hashlib").sha256(evil.read_bytes()).hexdigest()
    (attack / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="a file inside the run directory itself"):
        load_run(attack)
    refused_by_every_entry_point(attack, fitted, marker, capsys)
    # A relative path would be read from wherever the command runs: refused even when trusted.
    config["model"] = "pair.py:make"
    (attack / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="a relative path"):
        load_run(attack, trust_code=True)
    assert_refused(command(["-m", "elbogap.cli.evaluate", ".", *FAST, "--trust-code"],
                           cwd=attack), "a relative path")
    assert not marker.exists()
    # With the word, the file runs (the marker appears): consent is what decides.
    config["model"] = f"{evil}:make"
    (attack / "config.json").write_text(json.dumps(config))
    result = command(["-m", "elbogap.cli.evaluate", str(attack), *FAST, "--trust-code"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.exists()


def test_a_trusted_file_runs_from_its_checked_bytes_never_a_planted_pyc(file_run, tmp_path):
    out, model_file = file_run
    # A .pyc compiled from other source, stamped with the real source's mtime and size, is what
    # an import through importlib would run instead of the checked source.
    marker = tmp_path / "pyc-ran"
    impostor = tmp_path / "impostor" / model_file.name
    impostor.parent.mkdir()
    impostor.write_text(PAYLOAD.format(marker=str(marker)) + FACTORY)
    source = model_file.read_bytes()
    stat = model_file.stat()
    os.utime(impostor, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    compiled = importlib.util.cache_from_source(str(impostor))
    __import__("py_compile").compile(str(impostor), cfile=compiled)
    data = bytearray(Path(compiled).read_bytes())
    # The header of a timestamp-based .pyc: flags, then the source's mtime and size.
    data[8:12] = int(stat.st_mtime).to_bytes(4, "little")
    data[12:16] = len(source).to_bytes(4, "little")
    planted = Path(importlib.util.cache_from_source(str(model_file)))
    planted.parent.mkdir(exist_ok=True)
    planted.write_bytes(bytes(data))
    run = load_run(out, trust_code=True)
    assert not marker.exists()
    assert run.options.epochs == 1
    # The file changed after its check: its new bytes are refused, as is a changed file.
    model_file.write_text(PAYLOAD.format(marker=str(marker)) + FACTORY)
    with pytest.raises(ConfigError, match="has changed since the run"):
        load_run(out, trust_code=True)
    assert not marker.exists()


def test_the_write_probe_never_follows_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".write-test").symlink_to(victim)
    run, _ = new_run(SETTINGS, out)
    run.release()
    assert victim.read_text() == "precious"


def test_two_names_of_one_directory_have_one_owner(tmp_path):
    """S/real and S/alias (a link to it) are one run directory: the second fit is refused."""
    real = tmp_path / "real"
    real.mkdir()
    alias = tmp_path / "alias"
    alias.symlink_to(real)
    first, _ = new_run(SETTINGS, real)
    try:
        worker = command(["-m", "elbogap.cli.fit", "--data", "synthetic", "--model",
                          "linear-gaussian", "--epochs", "1", "--out", str(alias),
                          "--overwrite", "--no-progress"], cwd=tmp_path)
        assert_refused(worker, f"{alias}: in use by scripts/fit.py (pid {os.getpid()}")
    finally:
        first.release()


def test_a_run_file_that_is_a_link_or_a_device_is_refused_not_read(fitted, tmp_path):
    """config.json -> /dev/zero would be read forever; a FIFO would block; a link could show
    one of your files as the run's: each is one line naming the file."""
    for name, plant, expected in (
            ("config.json", lambda p: p.symlink_to("/dev/zero"), "a symbolic link"),
            ("metrics.jsonl", lambda p: os.mkfifo(p), "not a regular file"),
            ("checkpoint.pt", lambda p: p.symlink_to(fitted / "checkpoint.pt"),
             "a symbolic link")):
        run = tmp_path / name
        shutil.copytree(fitted, run)
        (run / name).unlink()
        plant(run / name)
        with pytest.raises(ConfigError, match=f"{name}: {expected}"):
            assert load_run(run).history is None  # read: a refusal before
