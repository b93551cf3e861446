"""An ArviZ ``InferenceData`` written to a NetCDF file without a half-written file ever in its
place."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..foundations.atomic import WriteError, write_atomic

# NetCDF takes '/' for its groups' separator: a Pyro site named "layer/0" is written with the
# division slash instead, which looks the same (the file's attributes map the names back).
NETCDF_SLASH = "\u2215"


def save_inference_data(idata, path: str | Path) -> None:
    """Write ``idata`` as NetCDF, through a temporary file renamed into place.  ArviZ writes to
    a path, not a stream: the scratch file is made with a unique name (``mkstemp``, never an
    existing file or a link) beside the target.  A failed write (a full disk) raises
    ``WriteError`` naming ``path``, which stays as it was."""
    path = Path(path)
    try:
        fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".nc")
    except OSError as e:
        raise WriteError(f"{path}: cannot write it ({e.strerror or e})") from None
    os.close(fd)
    tmp = Path(scratch)
    try:
        netcdf_names(idata).to_netcdf(str(tmp))
        data = tmp.read_bytes()
    except OSError as e:  # h5py's message is a page long; its errno says it all
        reason = os.strerror(e.errno) if e.errno else str(e).splitlines()[0]
        raise WriteError(f"{path}: cannot write it ({reason}); the file there is as it "
                         "was") from None
    finally:
        tmp.unlink(missing_ok=True)
    write_atomic(path, lambda f: f.write(data))


def netcdf_names(idata):
    """``idata`` with every name that holds '/' (variables, dimensions, coordinates) written
    with ``NETCDF_SLASH``, the original names in each group's ``renamed`` attribute."""
    from arviz import InferenceData

    groups = {}
    for group in idata.groups():
        dataset = getattr(idata, group)
        names = {str(n): str(n).replace("/", NETCDF_SLASH)
                 for n in [*dataset.data_vars, *dataset.dims, *dataset.coords] if "/" in str(n)}
        if names:
            dataset = dataset.rename(names)
            dataset.attrs["renamed"] = json.dumps({v: k for k, v in names.items()})
        groups[group] = dataset
    return InferenceData(**groups)
