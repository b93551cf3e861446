"""Every reader of data files raises DataError, and only DataError, on arbitrary bytes; an empty
array is named as such."""

import gzip

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elbogap.data.readers import load_array, load_frey_face, read_amat, read_idx
from elbogap.foundations.errors import DataError

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---- every parser raises only DataError on arbitrary bytes ------------------------------------


@FUZZ
@given(raw=st.binary(max_size=400), gz=st.booleans(), magic=st.sampled_from([2049, 2051]))
def test_fuzz_idx(tmp_path, raw, gz, magic):
    path = tmp_path / ("f.gz" if gz else "f")
    path.write_bytes(gzip.compress(raw) if gz and raw[:1] == b"\x00" else raw)
    try:
        read_idx(path, magic)
    except DataError:
        pass


@FUZZ
@given(raw=st.one_of(st.binary(max_size=400),
                     st.text(alphabet="01 \n\r\t.-2e", max_size=400).map(str.encode)))
def test_fuzz_amat(tmp_path, raw):
    path = tmp_path / "f.amat"
    path.write_bytes(raw)
    try:
        read_amat(path, width=4)
    except DataError:
        pass


@FUZZ
@given(raw=st.binary(max_size=600))
def test_fuzz_frey_mat(tmp_path, raw):
    path = tmp_path / "frey_rawface.mat"
    path.write_bytes(b"MATLAB 5.0 MAT-file" + raw if raw[:1] == b"\x01" else raw)
    try:
        load_frey_face(path)
    except DataError:
        pass


@FUZZ
@given(raw=st.binary(max_size=400), suffix=st.sampled_from([".npy", ".npz", ".csv", ".txt"]))
def test_fuzz_user_arrays(tmp_path, raw, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(raw)
    try:
        load_array(path)
    except DataError:
        pass


def test_an_empty_array_is_refused_by_name(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 3)))
    with pytest.raises(DataError, match="expected \\(data points >= 2, features\\)"):
        load_array(tmp_path / "empty.npy")
