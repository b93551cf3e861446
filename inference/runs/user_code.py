"""Loading a user's model/guide pair from a Python file, ``path/to/file.py:name``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ..foundations.errors import OptionError


def is_file_spec(spec: str) -> bool:
    return ":" in spec and spec.rsplit(":", 1)[0].endswith(".py")


def load_object(spec: str) -> object:
    """The object named ``name`` in the Python file of ``"path/to/file.py:name"``."""
    path_text, _, name = spec.rpartition(":")
    path = Path(path_text)
    if not name:
        raise OptionError("model", f"{{option}} {spec}: expected path/to/file.py:name")
    if not path.is_file():
        raise OptionError("model", f"{{option}} {spec}: file {path} does not exist")
    module_name = f"elbogap_user_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise OptionError("model", f"{{option}} {spec}: importing {path} failed: "
                                   f"{type(e).__name__}: {e}") from e
    if not hasattr(module, name):
        raise OptionError("model", f"{{option}} {spec}: {path} defines no '{name}'")
    return getattr(module, name)
