"""Files are written whole or not at all, never through a link, and a failed write is one clear
error that leaves the old file as it was."""

from __future__ import annotations

import os

import arviz
import numpy as np
import pytest

from elbogap.foundations.atomic import WriteError, write_atomic, write_text_atomic
from elbogap.presentation.inference_data import save_inference_data


def test_a_link_at_the_target_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "report.html").symlink_to(victim)
    write_text_atomic(tmp_path / "report.html", "<html></html>")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "report.html").is_symlink()
    assert (tmp_path / "report.html").read_text() == "<html></html>"


def test_a_planted_link_at_a_temporary_name_is_never_written_through(tmp_path):
    """Temporary names are made anew (mkstemp): a link planted at the name an older version
    used (.inference_data.nc.tmp) or at any guessable name is left alone."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for name in (".inference_data.nc.tmp", ".inference_data.nc.nc", ".report.html.tmp"):
        (tmp_path / name).symlink_to(victim)
    save_inference_data(arviz.from_dict(posterior={"z": np.zeros((1, 5))}),
                        tmp_path / "inference_data.nc")
    write_text_atomic(tmp_path / "report.html", "text")
    assert victim.read_text() == "precious"
    assert arviz.from_netcdf(str(tmp_path / "inference_data.nc")).posterior["z"].shape == (1, 5)


def test_a_failed_write_names_the_file_and_leaves_the_old_one(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"the last good checkpoint")

    def fails_midway(f):
        f.write(b"half")
        raise OSError(28, os.strerror(28))  # ENOSPC, as a full disk raises it

    with pytest.raises(WriteError, match=r"checkpoint.pt: cannot write it \(No space left on "
                                         r"device\); the file there is as it was"):
        write_atomic(target, fails_midway)
    assert target.read_bytes() == b"the last good checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
