"""Loaders read good files and reject bad ones with a message naming the file."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from elbogap.data.catalog import load_dataset
from elbogap.data.readers import (
    load_array,
    load_binarized_mnist,
    load_digits,
    load_frey_face,
    load_mnist,
    read_amat,
    read_idx,
)
from elbogap.foundations.errors import DataError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(directory: Path, n_train=6, n_test=4, gz=True) -> None:
    rng = np.random.RandomState(0)
    files = {
        "train-images-idx3-ubyte": idx_bytes(rng.randint(0, 256, (n_train, 28, 28)), 2051),
        "train-labels-idx1-ubyte": idx_bytes(rng.randint(0, 10, n_train), 2049),
        "t10k-images-idx3-ubyte": idx_bytes(rng.randint(0, 256, (n_test, 28, 28)), 2051),
        "t10k-labels-idx1-ubyte": idx_bytes(rng.randint(0, 10, n_test), 2049),
    }
    for name, raw in files.items():
        if gz:
            (directory / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (directory / name).write_bytes(raw)


def test_digits_is_binary_with_fixed_split():
    a, b = load_digits(), load_digits()
    assert a.train.shape == (1500, 64) and a.test.shape == (297, 64)
    assert set(a.train.unique().tolist()) == {0.0, 1.0}
    assert (a.train == b.train).all() and (a.test == b.test).all()


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_reads_idx(tmp_path, gz):
    write_mnist(tmp_path, gz=gz)
    fixed = load_mnist(tmp_path, "fixed")
    assert fixed.train.shape == (6, 784) and fixed.test.shape == (4, 784)
    assert set(fixed.train.unique().tolist()) <= {0.0, 1.0}
    dynamic = load_mnist(tmp_path, "dynamic")
    assert dynamic.dynamic_binarization and dynamic.train.max() <= 1
    import torch
    e1 = dynamic.train_epoch(torch.Generator().manual_seed(1))
    e2 = dynamic.train_epoch(torch.Generator().manual_seed(2))
    assert set(e1.unique().tolist()) <= {0.0, 1.0} and not torch.equal(e1, e2)
    # The test split is binarized once, the same way every time.
    assert torch.equal(dynamic.test, load_mnist(tmp_path, "dynamic").test)


def test_idx_rejects_corrupt_gzip(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        load_mnist(tmp_path)


def test_idx_rejects_truncated_data(tmp_path):
    raw = idx_bytes(np.zeros((3, 28, 28)), 2051)[:-5]
    path = tmp_path / "images"
    path.write_bytes(raw)
    with pytest.raises(DataError, match="images: header promises .* \\(truncated"):
        read_idx(path, 2051)


def test_idx_rejects_wrong_magic_and_short_header(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(idx_bytes(np.zeros(5), 2049))
    with pytest.raises(DataError, match="magic number 2049, expected 2051"):
        read_idx(path, 2051)
    path.write_bytes(idx_bytes(np.zeros((1, 1, 1)), 2051)[:10])
    with pytest.raises(DataError, match="shorter than an IDX header"):
        read_idx(path, 2051)


def test_mnist_rejects_count_mismatch_and_missing_files(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(3), 2049))
    )
    with pytest.raises(DataError, match="4 images but t10k-labels-idx1-ubyte.gz has 3 labels"):
        load_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="no t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path)
    with pytest.raises(DataError, match="no such directory"):
        load_mnist(tmp_path / "nope")


def amat_text(rows: np.ndarray) -> str:
    return "".join(" ".join(str(int(v)) for v in row) + "\n" for row in rows)


def test_amat_reads_canonical_and_loose_layouts(tmp_path):
    rows = (np.random.RandomState(0).rand(5, 784) > 0.5).astype(int)
    for name, text in (("a.amat", amat_text(rows)),
                       ("b.amat", amat_text(rows).replace("\n", " \r\n"))):
        (tmp_path / name).write_text(text)
        np.testing.assert_array_equal(read_amat(tmp_path / name), rows)
    (tmp_path / "c.amat.gz").write_bytes(gzip.compress(amat_text(rows).encode()))
    np.testing.assert_array_equal(read_amat(tmp_path / "c.amat.gz"), rows)


def test_amat_rejects_wrong_width_and_values(tmp_path):
    path = tmp_path / "x.amat"
    path.write_text(amat_text(np.ones((2, 783))))
    with pytest.raises(DataError, match="x.amat: line 1 has 783 values, expected 784"):
        read_amat(path)
    rows = np.ones((2, 784))
    rows[1, 5] = 2
    path.write_text(amat_text(rows))
    with pytest.raises(DataError, match="line 2 has values other than 0 and 1"):
        read_amat(path)
    path.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(DataError, match="not a text .amat"):
        read_amat(path)


def test_binarized_mnist_directory(tmp_path):
    rows = (np.random.RandomState(0).rand(3, 784) > 0.5).astype(int)
    for split in ("train", "valid", "test"):
        (tmp_path / f"binarized_mnist_{split}.amat").write_text(amat_text(rows))
    data = load_binarized_mnist(tmp_path)
    assert data.train.shape == (6, 784) and data.test.shape == (3, 784)
    (tmp_path / "binarized_mnist_valid.amat").unlink()
    with pytest.raises(DataError, match="no binarized_mnist_valid.amat"):
        load_binarized_mnist(tmp_path)


def test_frey_face(tmp_path):
    ff = np.random.RandomState(0).randint(0, 256, (560, 300)).astype(np.uint8)
    scipy.io.savemat(tmp_path / "frey_rawface.mat", {"ff": ff})
    data = load_frey_face(tmp_path, num_test=30)
    assert data.train.shape == (270, 560) and data.likelihood == "gaussian"
    assert 0 <= data.train.min() and data.train.max() <= 1
    scipy.io.savemat(tmp_path / "other.mat", {"faces": ff})
    with pytest.raises(DataError, match="other.mat: no variable 'ff'"):
        load_frey_face(tmp_path / "other.mat")
    (tmp_path / "bad.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(DataError, match="bad.mat: not a readable MATLAB"):
        load_frey_face(tmp_path / "bad.mat")
    scipy.io.savemat(tmp_path / "shape.mat", {"ff": np.zeros((10, 4))})
    with pytest.raises(DataError, match="'ff' has shape \\(10, 4\\)"):
        load_frey_face(tmp_path / "shape.mat")


def test_user_arrays(tmp_path):
    x = np.random.RandomState(0).randn(50, 4)
    np.save(tmp_path / "x.npy", x)
    np.savetxt(tmp_path / "x.csv", x, delimiter=",")
    np.savez(tmp_path / "x.npz", data=(x > 0).astype(float))
    a, b = load_array(tmp_path / "x.npy"), load_array(tmp_path / "x.csv")
    assert a.train.shape == (45, 4) and a.test.shape == (5, 4) and a.likelihood == "gaussian"
    np.testing.assert_allclose(a.train.numpy(), b.train.numpy(), rtol=1e-6)
    assert load_array(tmp_path / "x.npz").likelihood == "bernoulli"
    x[3, 1] = np.nan
    x[7, 0] = np.inf
    np.save(tmp_path / "bad.npy", x)
    with pytest.raises(DataError, match="bad.npy: 2 NaN or infinite values, in rows \\[3, 7\\]"):
        load_array(tmp_path / "bad.npy")
    # A vector: one value per point, for a program that takes a vector x.
    np.save(tmp_path / "flat.npy", np.arange(10.0))
    assert load_array(tmp_path / "flat.npy").train.shape == (9,)
    np.save(tmp_path / "cube.npy", np.zeros((5, 2, 2)))
    with pytest.raises(DataError, match="cube.npy: array of shape \\(5, 2, 2\\)"):
        load_array(tmp_path / "cube.npy")
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(DataError, match="unknown extension"):
        load_array(tmp_path / "x.json")
    (tmp_path / "words.csv").write_text("a,b\nc,d\n")
    with pytest.raises(DataError, match="words.csv: cannot be read as a numeric array"):
        load_array(tmp_path / "words.csv")


def test_an_npz_of_named_arrays_holds_the_programs_keyword_arguments(tmp_path):
    g = np.random.RandomState(0)
    x, y, lengths = g.randn(50, 3), g.randn(50), g.randint(1, 5, size=50)
    np.savez(tmp_path / "xy.npz", x=x, y=y, lengths=lengths, mask=y > 0, prior_scale=2.0)
    data = load_array(tmp_path / "xy.npz")
    assert data.train.shape == (45,) and data.test.shape == (5,)
    train = data.train.kwargs
    assert set(train) == {"x", "y", "lengths", "mask", "prior_scale"}
    assert train["x"].shape == (45, 3) and train["y"].dtype == torch.float32
    assert train["lengths"].dtype == torch.int64 and train["mask"].dtype == torch.bool
    assert train["prior_scale"].shape == () and "prior_scale" not in data.train.batched
    # The same rows of every per-point array, in the order a single matrix is split.
    order = np.random.RandomState(0).permutation(50)
    np.testing.assert_allclose(data.test.kwargs["y"].numpy(), y[order[:5]], rtol=1e-6)
    np.testing.assert_array_equal(train["lengths"].numpy(), lengths[order[5:]])
    np.savez(tmp_path / "bad.npz", x=x, y=np.where(np.arange(50) == 3, np.nan, y))
    with pytest.raises(DataError, match="bad.npz, array 'y': 1 NaN or infinite values, in rows"
                                        " \\[3\\]"):
        load_array(tmp_path / "bad.npz")


def test_load_dataset_names():
    with pytest.raises(DataError, match="pass their directory"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="unknown data set 'cifar'"):
        load_dataset("cifar", "/tmp")


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="benchmark data not beside the project")
def test_real_benchmark_files_have_documented_shapes():
    mnist = load_mnist(SHARED / "mnist", "threshold")
    assert mnist.train.shape == (60000, 784) and mnist.test.shape == (10000, 784)
    larochelle = load_binarized_mnist(SHARED / "binarized_mnist")
    assert larochelle.train.shape == (60000, 784) and larochelle.test.shape == (10000, 784)
    assert abs(larochelle.test.mean().item() - 0.1325) < 1e-4
    frey = load_frey_face(SHARED / "frey_face")
    assert frey.train.shape[0] + frey.test.shape[0] == 1965


def test_subsets_are_random_fixed_and_nested_never_the_first_rows():
    """Larochelle's binarized MNIST test set is sorted by class: its first rows are all zeros."""
    import torch

    from elbogap.data.dataset import subset

    x = torch.arange(100).repeat_interleave(10).reshape(-1, 1)  # 100 "classes" of 10, sorted
    small, large = subset(x, 20), subset(x, 50)
    assert torch.equal(subset(x, 20), small)  # fixed
    assert len(set(small.flatten().tolist())) > 10  # spread over classes, not the first two
    assert set(small.flatten().tolist()) <= set(large.flatten().tolist())  # nested
    assert torch.equal(subset(x, None), x) and torch.equal(subset(x, 2000), x)
