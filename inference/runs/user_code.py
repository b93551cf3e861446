"""A user's code named by a run: loading a model/guide factory from a Python file,
``path/to/file.py:name``, and the rule a run directory's config is held to before any code it
names is imported.

A run directory may come from anyone (a colleague's results, a paper's artifacts, a download),
and its ``config.json`` can name any file or importable module.  As Hugging Face's
``trust_remote_code``, loading such a run needs the user's word (``trust_code=True``,
``--trust-code``); registered names (entry points of installed packages) need none.  A file is
then read once, its bytes checked against the sha256 recorded when the run was fitted, and
compiled from those bytes (never through a ``.pyc`` that could stand in for them).
"""

from __future__ import annotations

import hashlib
import sys
import types
from pathlib import Path

from ..foundations.errors import ConfigError, OptionError

# The model file's sha256 in a run's config, for a model ``path/to/file.py:name``.
MODEL_DIGEST = "model_sha256"
TRUST_CODE = "pass trust_code=True (--trust-code)"
TRUST_FILE = ("if you trust the file as it is now, pass trust_model_file=True "
              "(--trust-model-file)")


def is_file_spec(spec: str) -> bool:
    return ":" in spec and spec.rsplit(":", 1)[0].endswith(".py")


def is_module_spec(spec: str) -> bool:
    """Whether ``spec`` is ``package.module:name``."""
    module, sep, name = spec.partition(":")
    return bool(sep) and all(part.isidentifier() for part in module.split(".")) and name.isidentifier()


def load_object(spec: str, digest: str | None = None) -> object:
    """The object named ``name`` in the Python file of ``"path/to/file.py:name"``, compiled from
    the bytes read here; where ``digest`` is given, only if those bytes have that sha256."""
    path_text, _, name = spec.rpartition(":")
    path = Path(path_text)
    if not name:
        raise OptionError("model", f"{{option}} {spec}: expected path/to/file.py:name")
    if not path.is_file():
        raise OptionError("model", f"{{option}} {spec}: file {path} does not exist")
    try:
        source = path.read_bytes()
    except OSError as e:
        raise OptionError("model", f"{{option}} {spec}: cannot read {path} "
                                   f"({e.strerror or e})") from None
    if digest is not None and hashlib.sha256(source).hexdigest() != digest:
        raise ConfigError(f"model {spec}: {path} changed while it was being loaded (its sha256 "
                          "is not the one checked); load the run again")
    module_name = f"elbogap_user_{path.stem}"
    module = types.ModuleType(module_name)
    module.__file__ = str(path)
    # Registered while it runs, as an import would: dataclasses and pickling look it up.
    sys.modules[module_name] = module
    # As ``python file.py`` would: the file's own folder is importable while it runs, so that
    # it can import its siblings (helpers.py beside it).  Its siblings are trusted with it:
    # only the file itself is checked against the run's sha256.
    folder = str(path.resolve().parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        exec(compile(source, str(path), "exec", dont_inherit=True), module.__dict__)
    except Exception as e:
        raise OptionError("model", f"{{option}} {spec}: importing {path} failed: "
                                   f"{type(e).__name__}: {e}") from e
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    if not hasattr(module, name):
        raise OptionError("model", f"{{option}} {spec}: {path} defines no '{name}'")
    return getattr(module, name)


def file_digest(path: str | Path) -> str:
    """The sha256 of a file's bytes, in hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def consent_to_code(config: dict, config_path: Path, *, trust_code: bool = False,
                    trust_model_file: bool = False) -> str | None:
    """Before a run's pair is built from ``config`` (read from ``config_path``): where its model
    is code (a file or a module rather than a registered name), refuse it unless ``trust_code``
    (or ``trust_model_file``, the stronger word); a file must moreover be named by an absolute
    path, exist, and be the file the run was fitted with (its sha256 then), unless
    ``trust_model_file``.  Say in one line on stderr what loading runs.  Returns the sha256
    the file's bytes must have when it is loaded (None where no file is named)."""
    spec = config["model"]
    file = is_file_spec(spec)
    if not file and not is_module_spec(spec):
        return None
    path = Path(spec.rpartition(":")[0])
    if file and not path.is_absolute():
        raise ConfigError(f"{config_path}: model {spec}: a relative path, which would be read "
                          "from wherever the command runs (a run's config names its model file "
                          "by its absolute path)")
    if not (trust_code or trust_model_file):
        if file:
            inside = (" (a file inside the run directory itself)"
                      if path.resolve().is_relative_to(config_path.parent.resolve()) else "")
            what = f"run the Python file {path}{inside}"
        else:
            what = f"import the module {spec.partition(':')[0]}, running its code"
        raise ConfigError(f"{config_path}: its model {spec} is code: loading the run would "
                          f"{what}; a run directory may come from anyone, so code runs only "
                          f"with your word: if you trust it, {TRUST_CODE}")
    if not file:
        print(f"note: loading the run imports {spec}, named in {config_path} (trusted as asked)",
              file=sys.stderr)
        return None
    if not path.is_file():
        raise ConfigError(f"{config_path}: its model file {path} does not exist here (the run "
                          f"was fitted with {spec}): put the file back at that path")
    recorded, now = config.get(MODEL_DIGEST), file_digest(path)
    changed = now != recorded
    if changed and not trust_model_file:
        if recorded is None:
            raise ConfigError(f"{config_path}: holds no sha256 of its model file {path} (written "
                              "before elbogap recorded one), so whether the file changed since "
                              f"the run cannot be told; {TRUST_FILE}")
        raise ConfigError(
            f"{config_path}: its model file {path} has changed since the run (sha256 "
            f"{recorded[:12]}... then, {now[:12]}... now), so it is not the code these "
            f"parameters were fitted with; {TRUST_FILE}")
    print(f"note: loading the run imports and runs {spec}, named in {config_path}"
          + (" (not checked against the run; trusted as asked)" if changed else ""),
          file=sys.stderr)
    return now
