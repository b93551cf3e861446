"""``--overwrite`` never loses the old run: a SIGKILL at any moment before the new run's first
checkpoint leaves the old run whole (in place, or beside it as ``.NAME.replaced``, which the
next command puts back); after it, the new run is the run.  A full disk is one line."""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elbogap.foundations.errors import OptionError
from elbogap.runs.ownership import lock_path, release
from elbogap.runs.run_directory import prepare_run_dir, replaced_run
from tests.limits import HANG_SECONDS

ROOT = Path(__file__).resolve().parents[2]
RUN = ["--data", "synthetic", "--model", "linear-gaussian", "--epochs", "2", "--num-samples",
       "10", "--eval-samples", "5", "--eval-points", "20", "--no-progress"]
# The first epoch made longer (its diagnostics, before the checkpoint): the window of a kill.
SLOW_FIRST_EPOCH = ["--eval-samples", "200", "--eval-points", "100"]
# Kills that land while the old run is aside (before the new run's first checkpoint); on a
# loaded machine some land after it, so up to three times as many are tried.
KILLS = 20


def fit_in_child(args: list[str]) -> None:
    """scripts/fit.py in a child of the forkserver (elbogap imported once, not per kill)."""
    from elbogap.cli.fit import command

    sys.stdout = sys.stderr = open(os.devnull, "w")
    os._exit(command(args))


def files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


@pytest.mark.slow
def test_the_old_run_survives_a_kill_at_any_moment_of_overwrite(tmp_path):
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["elbogap.cli.fit"])
    old = tmp_path / "old"
    first = context.Process(target=fit_in_child, args=([*RUN, "--seed", "1", "--out", str(old)],))
    first.start()
    first.join(HANG_SECONDS)
    assert first.exitcode == 0
    old_files = files(old)
    run = tmp_path / "run"
    overwrite = [*RUN, *SLOW_FIRST_EPOCH, "--seed", "2", "--out", str(run), "--overwrite"]

    def fresh_old_run() -> None:
        for path in (run, replaced_run(run)):
            shutil.rmtree(path, ignore_errors=True)
        lock_path(run).unlink(missing_ok=True)
        shutil.copytree(old, run)

    def uninterrupted() -> tuple[float, float]:
        """When an overwrite moves the old run aside, and when its first checkpoint is written
        (seconds from its start)."""
        fresh_old_run()
        child = context.Process(target=fit_in_child, args=(overwrite,))
        start = time.monotonic()
        child.start()
        moved = None
        # The old run is aside from the move until the new run's first checkpoint.
        while child.is_alive() and (moved is None or replaced_run(run).exists()):
            if moved is None and replaced_run(run).exists():
                moved = time.monotonic() - start
            time.sleep(0.002)
        committed = time.monotonic() - start
        child.join(HANG_SECONDS)
        assert child.exitcode == 0 and not replaced_run(run).exists() and moved is not None
        return moved, committed

    moved, committed = uninterrupted()
    rng = random.Random(0)
    before_commit = 0
    for _ in range(3 * KILLS):
        if before_commit == KILLS:
            break
        fresh_old_run()
        child = context.Process(target=fit_in_child, args=(overwrite,))
        child.start()
        # Mostly between the move and the commit, the moments where the old run is aside.
        time.sleep(rng.uniform(0.8 * moved, committed))
        os.kill(child.pid, signal.SIGKILL)
        child.join(HANG_SECONDS)
        if (run / "checkpoint.pt").is_file() and files(run) != old_files:
            # Killed after the new run's first checkpoint: the new run is the run.
            continue
        before_commit += 1
        places = [p for p in (run, replaced_run(run)) if p.is_dir() and files(p) == old_files]
        assert places, sorted(p.name for p in tmp_path.iterdir())
        # The next command on the directory puts the old run back, and refuses to replace it
        # without --overwrite.
        with pytest.raises(OptionError, match="already holds a run"):
            prepare_run_dir(run)
        release(run)
        assert files(run) == old_files and not replaced_run(run).exists()
    assert before_commit == KILLS, before_commit


def test_an_overwrite_that_fails_before_its_first_checkpoint_leaves_the_old_run(tmp_path,
                                                                                  capsys):
    from elbogap.cli.fit import command

    run = tmp_path / "run"
    assert command([*RUN, "--epochs", "1", "--seed", "1", "--out", str(run)]) == 0
    old_files = files(run)
    # A model file that fails in training only: its first step raises.
    failing = tmp_path / "failing.py"
    failing.write_text(
        "import pyro, pyro.distributions as dist, torch\n"
        "def make(data_dim):\n"
        "    loc = torch.zeros(data_dim)\n"
        "    def model(x):\n"
        "        with pyro.plate('data', x.shape[0]):\n"
        "            z = pyro.sample('z', dist.Normal(loc, 1.0).to_event(1))\n"
        "            if torch.is_grad_enabled():\n"
        "                raise RuntimeError('fails in training')\n"
        "            pyro.sample('x', dist.Normal(z, 1.0).to_event(1), obs=x)\n"
        "    return model\n")
    assert command([*RUN, "--model", f"{failing}:make", "--out", str(run), "--overwrite"]) != 0
    assert files(run) == old_files and not replaced_run(run).exists()


def full_tmpfs(path: Path) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def fill(disk: Path, free_kb: int) -> None:
    """Fill ``disk`` until ``free_kb`` KiB are left."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    stat = os.statvfs(disk)
    size = max(stat.f_bavail * stat.f_frsize - free_kb * 1024, 0)
    with open(filler, "wb") as f:
        try:
            f.write(b"\0" * size)
            f.flush()
        except OSError:
            pass


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_file(tmp_path, capsys):
    """A file system with no space left (ENOSPC, a real one: tmpfs) fails each command with one
    line naming the file, and the run's files stay as they were."""
    from elbogap.cli.evaluate import command as evaluate
    from elbogap.cli.fit import command as fit
    from elbogap.cli.report import command as report

    disk = tmp_path / "disk"
    if not full_tmpfs(disk):
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    try:
        run = disk / "run"
        assert fit([*RUN, "--out", str(run)]) == 0
        release(run)
        before = files(run)
        commands = {
            "fit": (fit, [*RUN, "--out", str(disk / "other"), "--overwrite"]),
            "overwrite": (fit, [*RUN, "--out", str(run), "--overwrite"]),
            "evaluate": (evaluate, [str(run), "-K", "10", "--no-progress"]),
            "report": (report, [str(run), "-K", "10", "--ais-points", "0",
                                "--amortization-points", "0", "--idata-points", "1",
                                "--idata-draws", "5", "--no-progress"]),
        }
        # No byte left (the lock files), and room for the small files but not the large ones
        # (report.html fits, inference_data.nc does not).
        capsys.readouterr()
        for free_kb in (0, 400):
            fill(disk, free_kb)
            for name, (command, args) in commands.items():
                code = command(args)
                for directory in (run, disk / "other"):
                    release(directory)
                err = capsys.readouterr().err
                assert "Traceback" not in err, (name, err[-3000:])
                if free_kb == 0 or code != 0:
                    assert code == 2, (name, err[-3000:])
                    last = err.strip().splitlines()[-1]
                    assert last.startswith("error: ") and "No space left on device" in last, (
                        name, last)
                    assert str(disk) in last, (name, last)  # the file is named
                if name == "overwrite" and code == 0:
                    before = files(run)  # replaced, as asked
                held = files(run)
                assert {k: held.get(k) for k in before} == before, name
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_replaced_run_left_beside_a_committed_new_run_is_removed_on_resume(tmp_path):
    """Killed between the new run's first checkpoint and the removal of the old run: the new run
    is the run, and --resume removes what is left of the old one."""
    from elbogap.cli.fit import command

    run = tmp_path / "run"
    assert command([*RUN, "--epochs", "1", "--out", str(run)]) == 0
    left = replaced_run(run)
    left.mkdir()
    (left / "config.json").write_text("{}")
    assert command(["--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert not left.exists() and len((run / "metrics.jsonl").read_text().splitlines()) == 2
