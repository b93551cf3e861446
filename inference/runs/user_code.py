"""Loading a user's model/guide pair from a Python file, ``path/to/file.py:name``, and checking
that a run's model file is still the one it was fitted with before running it."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

from ..foundations.errors import ConfigError, OptionError


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


def file_digest(path: str | Path) -> str:
    """The sha256 of a file's bytes, in hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


TRUST = ("if you trust the file as it is now, pass trust_model_file=True "
         "(--trust-model-file)")


def check_model_file(spec: str, digest: str | None, config_path: Path,
                     trust: bool = False) -> None:
    """Before a run's model file is imported: refuse it when it is missing, or changed since the
    run (``digest``, its sha256 then; None where the config predates it) unless ``trust``; then
    say in one line that loading the run runs it.  A run directory may come from anyone, and
    importing a file runs all of it."""
    path = Path(spec.rpartition(":")[0])
    if not path.is_file():
        raise ConfigError(f"{config_path}: its model file {path} does not exist here (the run "
                          f"was fitted with {spec}): put the file back at that path")
    now = file_digest(path)
    changed = now != digest
    if changed and not trust:
        if digest is None:
            raise ConfigError(f"{config_path}: holds no sha256 of its model file {path} (written "
                              "before elbogap recorded one), so whether the file changed since "
                              f"the run cannot be told; {TRUST}")
        raise ConfigError(
            f"{config_path}: its model file {path} has changed since the run (sha256 "
            f"{digest[:12]}... then, {now[:12]}... now), so it is not the code these parameters "
            f"were fitted with; {TRUST}")
    print(f"note: loading the run imports and runs {spec}, named in {config_path}"
          + (" (not checked against the run; trusted as asked)" if changed else ""),
          file=sys.stderr)
