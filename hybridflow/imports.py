"""User code named in a config: ``path/to/file.py:name`` or ``package.module:name``.

    fn = load_object("my_losses.py:clipped_loss", what="actor.policy_loss")
    spec = portable_spec(fn)        # "/abs/my_losses.py:clipped_loss": any process can load it

A config names a function by a string, so that every worker process can find it itself (a Ray
worker never runs the controller's script). :func:`load_object` resolves such a spec in the
calling process; :func:`portable_spec` turns a function back into a spec that another process can
load (its importable module, else the file it was defined in). Errors raise ``error`` (a
ValueError subclass, :class:`ImportSpecError` by default) naming the spec and ``what`` asked for
it: missing file, a syntax error with its line, an exception raised at import (the file's
frames), a missing name (listing what the file defines).

A file is executed once per process (again when it changed) and kept under a private module name that is *not* in
``sys.modules`` after loading, so cloudpickle ships its functions by value; relative paths
resolve against the current working directory.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["ImportSpecError", "is_spec", "load_object", "load_file", "portable_spec"]

_FILES: dict[tuple, Any] = {}  # (absolute path, mtime, size) -> its module: once per process and version


class ImportSpecError(ValueError):
    """A spec that does not name a loadable object; the message names the spec."""


def is_spec(text: Any) -> bool:
    """Whether ``text`` is a ``location:name`` spec rather than a plain registry name."""
    return isinstance(text, str) and ":" in text and not text.startswith("builtin:")


def _is_file(location: str) -> bool:
    return location.endswith(".py") or "/" in location or os.sep in location


def load_file(path: Path, spec_text: str, what: str = "", error: type = ImportSpecError) -> Any:
    """The module of the Python file ``path`` (executed on first use in this process)."""
    path = Path(path).expanduser()
    path = path if path.is_absolute() else Path.cwd() / path
    label = f"{what} {spec_text!r}" if what else repr(spec_text)
    if not path.is_file():
        raise error(f"{label}: file not found: {path}")
    stat = path.stat()
    version = (path, stat.st_mtime_ns, stat.st_size)
    if version in _FILES:
        return _FILES[version]
    module_name = f"_hybridflow_user_{path.stem}_{abs(hash(str(path))):x}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise error(f"{label}: cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # present while it runs (dataclasses look it up), removed after
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        line = (exc.text or "").rstrip("\n")
        pointer = " " * max((exc.offset or 1) - 1, 0) + "^" if line else ""
        raise error(f"{label}: syntax error in {path}, line {exc.lineno}: {exc.msg}\n    {line}\n    {pointer}") \
            from exc
    except Exception as exc:  # noqa: BLE001 - whatever the file raises at import, report it with its frames
        frames = traceback.extract_tb(exc.__traceback__)
        own = [f for f in frames if Path(f.filename) == path] or frames[-1:]
        raise error(f"{label}: importing {path} raised {type(exc).__name__}: {exc}\n"
                    f"{''.join(traceback.format_list(own))}") from exc
    finally:
        sys.modules.pop(module_name, None)
    _FILES[version] = module
    return module


def _attribute(owner: Any, qualname: str) -> Any:
    value = owner
    for part in qualname.split("."):
        value = getattr(value, part)
    return value


def load_object(spec: str, *, what: str = "", error: type = ImportSpecError) -> Any:
    """The object a ``path/to/file.py:name`` or ``package.module:name`` spec names (``name`` may
    be dotted: ``Class.method``)."""
    label = f"{what} {spec!r}" if what else repr(spec)
    location, _, name = str(spec).rpartition(":")
    if not location or not name:
        raise error(f"{label} must look like 'path/to/file.py:name' or 'package.module:name'")
    if _is_file(location):
        module = load_file(Path(location), spec, what, error)
        where = str(Path(location).expanduser().absolute())
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as exc:
            raise error(f"{label}: cannot import module {location!r}: {exc}") from exc
        where = f"module {location}"
    try:
        return _attribute(module, name)
    except AttributeError:
        defined = sorted(k for k, v in vars(module).items()
                         if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == module.__name__)
        raise error(f"{label}: {where} defines no {name!r}; callables it defines: "
                    f"{', '.join(defined) if defined else '(none)'}") from None


def portable_spec(fn: Callable) -> Optional[str]:
    """A spec that loads ``fn`` in another process: ``module:qualname`` when its module is
    importable by name, else ``/abs/file.py:qualname`` when it was defined in a file (a script
    run as ``__main__``, a file loaded by :func:`load_file`); None otherwise (a lambda, a
    function typed into a REPL or a notebook)."""
    qualname = getattr(fn, "__qualname__", "")
    if not qualname or "<" in qualname:
        return None
    module = getattr(fn, "__module__", None)
    loaded = sys.modules.get(module) if module else None
    if module and module != "__main__" and loaded is not None and getattr(loaded, "__spec__", None) is not None \
            and loaded.__spec__.name == module:
        return f"{module}:{qualname}"
    code = getattr(fn, "__code__", None)
    filename = getattr(code, "co_filename", "")
    if filename and os.path.isfile(filename):
        return f"{os.path.abspath(filename)}:{qualname}"
    return None
