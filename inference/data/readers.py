"""Readers of the data files elbogap knows, each returning a ``Dataset``.

Every reader checks what it reads and raises ``DataError`` naming the file and what was
expected; none downloads anything.  The default, scikit-learn's bundled 8x8 digits, ships inside
an installed package.
"""

from __future__ import annotations

import gzip
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from ..foundations.errors import DataError
from ..foundations.program_data import ProgramData
from .dataset import DATA_SEED, Dataset

BINARIZATIONS = ("threshold", "fixed", "dynamic")


def _fixed_split(x: np.ndarray, num_test: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.RandomState(DATA_SEED).permutation(len(x))
    return x[order[num_test:]], x[order[:num_test]]


def _binarize(grey: torch.Tensor, how: str) -> torch.Tensor:
    if how == "threshold":
        return (grey > 0.5).float()
    return torch.bernoulli(grey, generator=torch.Generator().manual_seed(DATA_SEED))


def _check_binarization(binarize: str) -> None:
    if binarize not in BINARIZATIONS:
        raise DataError(f"binarize must be one of {BINARIZATIONS}, got {binarize!r}")


def load_digits(num_test: int = 297) -> Dataset:
    """scikit-learn's 1797 bundled 8x8 digits, binarized: a pixel is 1 when its level is > 8 of 16.

    The split is a fixed permutation (seed 0): 1500 train, 297 test images.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    images = sklearn_digits().data.astype(np.float32)
    binary = (images > 8).astype(np.float32)
    train, test = _fixed_split(binary, num_test)
    return Dataset("digits", torch.from_numpy(train), torch.from_numpy(test), (8, 8), "bernoulli")


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip file ({e})") from None
    if path.suffix == ".gz":
        raise DataError(f"{path}: named .gz but is not a gzip file")
    return raw


def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """An IDX file (LeCun's MNIST format) of unsigned bytes, gzipped or not."""
    path = Path(path)
    raw = _read_bytes(path)
    ndim = {2049: 1, 2051: 3}[expected_magic]
    header = 4 + 4 * ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic is not None and magic != expected_magic:
        raise DataError(
            f"{path}: IDX magic number {magic}, expected {expected_magic} "
            f"({'images' if expected_magic == 2051 else 'labels'})"
        )
    if len(raw) < header:
        raise DataError(f"{path}: {len(raw)} bytes, shorter than an IDX header ({header} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise DataError(
            f"{path}: header promises {shape} = {size} bytes of data, file has {len(raw) - header}"
            " (truncated or corrupt)"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"{directory}: no {stem}.gz or {stem} (expected MNIST IDX files here)")


def load_mnist(directory: str | Path, binarize: str = "dynamic") -> Dataset:
    """MNIST from the four IDX files (``.gz`` or not) in ``directory``.

    ``binarize``: ``threshold`` (pixel > 0.5), ``fixed`` (one Bernoulli draw, seed 0) or
    ``dynamic`` (train redrawn every epoch, test drawn once with seed 0, as in Burda et al. 2016).
    """
    directory = Path(directory)
    _check_binarization(binarize)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory (expected the MNIST IDX files)")
    splits = {}
    for split, (images_stem, labels_stem) in MNIST_FILES.items():
        images_path, labels_path = _find(directory, images_stem), _find(directory, labels_stem)
        images = read_idx(images_path, 2051)
        labels = read_idx(labels_path, 2049)
        if images.shape[1:] != (28, 28):
            raise DataError(f"{images_path}: images are {images.shape[1:]}, expected 28x28")
        if len(images) != len(labels):
            raise DataError(
                f"{images_path}: {len(images)} images but {labels_path.name} has {len(labels)}"
                " labels"
            )
        splits[split] = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255)
    dynamic = binarize == "dynamic"
    train = splits["train"] if dynamic else _binarize(splits["train"], binarize)
    test = _binarize(splits["test"], "fixed" if dynamic else binarize)
    return Dataset("mnist", train, test, (28, 28), "bernoulli", dynamic_binarization=dynamic)


def read_amat(path: str | Path, width: int = 784) -> np.ndarray:
    """A Larochelle ``.amat`` text file of 0/1 values, ``width`` per line, gzipped or not."""
    path = Path(path)
    raw = _read_bytes(path)
    row = 2 * width
    data = np.frombuffer(raw, np.uint8)
    if len(raw) and len(raw) % row == 0:
        # Fast path for the canonical layout: one digit, one separator, newline at the end.
        grid = data.reshape(-1, row)
        digits = grid[:, 0::2]
        if (
            np.isin(digits, (48, 49)).all()
            and (grid[:, 1:-1:2] == 32).all()
            and (grid[:, -1] == 10).all()
        ):
            return (digits - 48).astype(np.float32)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text .amat file (non-ASCII bytes)") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path}: empty .amat file, expected lines of {width} values 0/1")
    rows = []
    for i, line in enumerate(lines, 1):
        fields = line.split()
        if len(fields) != width:
            raise DataError(f"{path}: line {i} has {len(fields)} values, expected {width}")
        try:
            values = np.array(fields, dtype=np.float64)
        except ValueError:
            raise DataError(f"{path}: line {i} has a value that is not a number") from None
        if not np.isin(values, (0.0, 1.0)).all():
            raise DataError(f"{path}: line {i} has values other than 0 and 1")
        rows.append(values.astype(np.float32))
    return np.stack(rows)


def load_binarized_mnist(directory: str | Path, include_valid: bool = True) -> Dataset:
    """Larochelle's fixed binarization of MNIST: ``binarized_mnist_{train,valid,test}.amat[.gz]``.

    The 10000 validation images join the training set by default (50000 + 10000), as in the
    papers that report test NLL on this data.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory (expected binarized_mnist_*.amat files)")
    parts = {s: read_amat(_find(directory, f"binarized_mnist_{s}.amat")) for s in
             (("train", "valid", "test") if include_valid else ("train", "test"))}
    train = np.concatenate([parts["train"]] + ([parts["valid"]] if include_valid else []))
    return Dataset(
        "binarized_mnist", torch.from_numpy(train), torch.from_numpy(parts["test"]), (28, 28),
        "bernoulli",
    )


def load_frey_face(path: str | Path, num_test: int = 265) -> Dataset:
    """Frey Face (1965 faces of 28x20 grey pixels) from ``frey_rawface.mat``, scaled to [0, 1].

    Continuous data: fit it with a Gaussian likelihood.  Fixed split (seed 0): 1700 train, 265 test.
    """
    from scipy.io import loadmat

    path = Path(path)
    if path.is_dir():
        path = path / "frey_rawface.mat"
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected frey_rawface.mat)")
    try:
        mat = loadmat(path)
    except Exception as e:  # scipy raises many types on a bad file; all mean the same here
        raise DataError(f"{path}: not a readable MATLAB .mat file ({e})") from None
    if "ff" not in mat:
        raise DataError(f"{path}: no variable 'ff' (expected Frey Face, 560 x 1965 uint8)")
    ff = np.asarray(mat["ff"])
    if ff.ndim != 2 or ff.shape[0] != 560:
        raise DataError(f"{path}: 'ff' has shape {ff.shape}, expected (560, number of faces)")
    faces = ff.T.astype(np.float32) / 255
    train, test = _fixed_split(faces, num_test)
    return Dataset("frey_face", torch.from_numpy(train), torch.from_numpy(test), (28, 20),
                   "gaussian")


def load_array(path: str | Path, num_test: int | None = None) -> Dataset:
    """A user's data from ``.npy``, ``.npz`` or ``.csv``/``.txt``: one matrix (rows are data
    points) or vector (one value per point), handed to the model as its one argument x; or an
    ``.npz`` of several named arrays, handed to the model as keyword arguments of those names
    (``x``, ``y``, ``mask``...), the arrays of the most common leading size split into rows.

    Binary data (only 0 and 1) gets a Bernoulli likelihood, anything else a Gaussian one.  The
    split is a fixed permutation (seed 0) with 10 % (at least one point) held out for testing.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory; --data array reads one file (a .npy, .npz or "
                        ".csv data matrix): give its path")
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected a .npy, .npz or .csv data matrix)")
    try:
        if path.suffix == ".npy":
            arrays = {"": np.load(path, allow_pickle=False)}
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
            if not arrays:
                raise DataError(f"{path}: holds no array")
        elif path.suffix in (".csv", ".txt"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an empty file is refused below, by name
                arrays = {"": np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None,
                                         ndmin=2)}
        else:
            raise DataError(f"{path}: unknown extension, expected .npy, .npz, .csv or .txt")
    except (ValueError, OSError, EOFError) as e:
        hint = ""
        if path.suffix in (".csv", ".txt") and _has_header(path):
            hint = ("; its first line looks like a header of column names: remove it (numbers "
                    "only, one row per data point)")
        raise DataError(f"{path}: cannot be read as a numeric array ({e}){hint}") from None
    if len(arrays) == 1:
        (array,) = arrays.values()
        array = _checked(path, "", array)
        num_test = max(1, len(array) // 10) if num_test is None else num_test
        train, test = _fixed_split(array, num_test)
        binary = np.isin(array, (0.0, 1.0)).all()
        return Dataset(path.stem, torch.from_numpy(train), torch.from_numpy(test), None,
                       "bernoulli" if binary else "gaussian")
    return _named_arrays(path, {name: _checked(path, name, a) for name, a in arrays.items()},
                         num_test)


def _has_header(path: Path) -> bool:
    """Whether a text file's first line holds a field that is not a number (a header row)."""
    with open(path, errors="replace") as f:
        first = f.readline()
    fields = [v.strip() for v in first.replace(",", " ").split()]
    try:
        [float(v) for v in fields]
    except ValueError:
        return True
    return False


def _checked(path: Path, name: str, array: np.ndarray) -> np.ndarray:
    """A numeric array of finite values, with one row per point: float32 (integers stay
    integers, as a count or an index is; booleans stay booleans, as a mask is)."""
    where = f"{path}" + (f", array '{name}'" if name else "")
    if not name and (array.ndim not in (1, 2) or array.shape[0] < 2):
        raise DataError(f"{where}: array of shape {array.shape}, expected (data points >= 2"
                        ", features) or (data points >= 2,)")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise DataError(f"{where}: array of dtype {array.dtype}, expected numbers")
    if np.issubdtype(array.dtype, np.floating):
        _refuse_rows(where, ~np.isfinite(array), "NaN or infinite values", "")
        with np.errstate(over="ignore"):  # refused just below, with the rows
            single = array.astype(np.float32)
        _refuse_rows(where, ~np.isfinite(single),
                     f"values beyond float32's range (|x| > {np.finfo(np.float32).max:.3g}; the "
                     f"largest {np.abs(array).max():.3g})",
                     ": elbogap computes in float32, where they are infinite; rescale the data")
        return single
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int64)
    return array


def _refuse_rows(where: str, bad: np.ndarray, what: str, remedy: str) -> None:
    """A ``DataError`` counting the ``bad`` values (``what`` they are) and naming their rows."""
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise DataError(f"{where}: {int(bad.sum())} {what}, in rows {rows[:10].tolist()}"
                        f"{' ...' if len(rows) > 10 else ''}{remedy}")


def _named_arrays(path: Path, arrays: dict[str, np.ndarray], num_test: int | None) -> Dataset:
    """The program's keyword arguments: arrays of the most common leading size N are split
    into train and test rows (the same rows of each); the others are passed whole to both."""
    sizes = [a.shape[0] for a in arrays.values() if a.ndim]
    n = max(set(sizes), key=lambda size: (sizes.count(size), size)) if sizes else 0
    if n < 2:
        raise DataError(f"{path}: arrays {sorted(arrays)} of shapes "
                        f"{[a.shape for a in arrays.values()]}: expected some with a leading "
                        "dimension of data points >= 2")
    # An array of nearly N rows is a per-point array that lost or gained some, not a table
    # of its own (a table's rows are few beside N): passed whole, its rows would be paired
    # with the wrong points.
    near = {name: a.shape[0] for name, a in arrays.items()
            if a.ndim and a.shape[0] != n and a.shape[0] >= n / 2}
    if near:
        counts = ", ".join(f"{name} has {a.shape[0]}" for name, a in arrays.items() if a.ndim)
        raise DataError(f"{path}: the arrays' row counts differ ({counts}): every array of one "
                        "row per data point needs the same rows (arrays of a different size "
                        "are passed whole to the model, as tables of their own)")
    num_test = max(1, n // 10) if num_test is None else num_test
    rows = frozenset(name for name, a in arrays.items() if a.ndim and a.shape[0] == n)
    # Every array of n rows split by the same fixed permutation: the same rows of each.
    parts = {name: _fixed_split(a, num_test) if name in rows else (a, a)
             for name, a in arrays.items()}
    train, test = (ProgramData(kwargs={name: torch.tensor(pair[i]) for name, pair in parts.items()},
                               batched=rows) for i in (0, 1))
    return Dataset(path.stem, train, test, None, "the model's")
