"""An ArviZ ``InferenceData`` written to a NetCDF file without a half-written file ever in its
place."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..foundations.atomic import write_atomic


def save_inference_data(idata, path: str | Path) -> None:
    """Write ``idata`` as NetCDF, through a temporary file renamed into place.  ArviZ writes to
    a path, not a stream: the scratch file is made with a unique name (``mkstemp``, never an
    existing file or a link) beside the target."""
    path = Path(path)
    fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".nc")
    os.close(fd)
    tmp = Path(scratch)
    try:
        idata.to_netcdf(str(tmp))
        data = tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    write_atomic(path, lambda f: f.write(data))
