"""Finding a reward function from its spec.

Two signatures are supported.

Per-sample (the default)::

    def my_reward(prompt: str, response: str, ground_truth, **extra) -> float | dict

``extra`` holds the batch's other per-sample columns: ``data_source``, ``extra_info`` and
anything else the batch has. A function without ``**extra`` receives only the extra names it
declares. A dict result must contain ``"score"`` (the reward); its other numeric keys are
logged as extra reward metrics (``reward/<key>/mean``).

Batch, marked by the ``@batch_reward`` decorator (``from hybridflow.trainer.rewards import
batch_reward``)::

    @batch_reward
    def my_rewards(prompts: list[str], responses: list[str], ground_truths: list, **extra_lists)
            -> list[float | dict]

called once per batch with one list per column (``extra_lists["data_source"]``, ...), returning
one result per sample, in order.

A spec is ``"path/to/file.py:fn_name"`` (relative paths resolve against the current working
directory), ``"builtin:<name>"`` (``exact_match``, ``gsm8k``, ``addition``) or a callable.
"""
from __future__ import annotations

import importlib.util
import inspect
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

_BATCH_ATTR = "__hybridflow_batch_reward__"


class RewardError(ValueError):
    """A reward function that cannot be loaded or that failed; the message names the function."""


def batch_reward(fn: Callable) -> Callable:
    """Mark ``fn(prompts, responses, ground_truths, **extra_lists) -> list`` as a batch reward."""
    setattr(fn, _BATCH_ATTR, True)
    return fn


def is_batch_reward(fn: Callable) -> bool:
    """Whether ``fn`` was marked with ``@batch_reward``."""
    return bool(getattr(fn, _BATCH_ATTR, False))


def function_name(fn: Callable) -> str:
    """A readable name for messages: ``file.py:name`` when loaded from a file, else the qualname."""
    origin = getattr(fn, "__hybridflow_origin__", None)
    return origin or getattr(fn, "__qualname__", None) or repr(fn)


def _builtin(name: str) -> Callable:
    from hybridflow.trainer.rewards.builtin import BUILTINS

    if name not in BUILTINS:
        raise RewardError(f"unknown built-in reward 'builtin:{name}'; available: "
                          f"{', '.join('builtin:' + n for n in sorted(BUILTINS))}")
    return BUILTINS[name]


def _load_module(path: Path, spec_text: str) -> Any:
    module_name = f"_hybridflow_reward_{path.stem}_{abs(hash(str(path))):x}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise RewardError(f"reward function {spec_text!r}: cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Present during execution (dataclasses and friends look the module up); removed afterwards so
    # that cloudpickle ships the function by value to other processes.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        line = (exc.text or "").rstrip("\n")
        pointer = " " * max((exc.offset or 1) - 1, 0) + "^" if line else ""
        raise RewardError(f"reward function {spec_text!r}: syntax error in {path}, line {exc.lineno}: "
                          f"{exc.msg}\n    {line}\n    {pointer}") from exc
    except Exception as exc:  # noqa: BLE001 - whatever the file raises at import, report it with its traceback
        frames = traceback.extract_tb(exc.__traceback__)
        own = [f for f in frames if Path(f.filename) == path] or frames[-1:]
        where = "".join(traceback.format_list(own))
        raise RewardError(f"reward function {spec_text!r}: importing {path} raised "
                          f"{type(exc).__name__}: {exc}\n{where}") from exc
    finally:
        sys.modules.pop(module_name, None)
    return module


def _check_signature(fn: Callable, where: str) -> None:
    """Raise RewardError now if fn cannot take (prompt(s), response(s), ground_truth(s))."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins and some C callables: nothing to check
    try:
        sig.bind_partial("prompt", "response", "ground_truth")
    except TypeError as exc:
        kind = "prompts, responses, ground_truths, **extra_lists" if is_batch_reward(fn) else \
            "prompt, response, ground_truth, **extra"
        raise RewardError(f"reward function {where} has signature {sig}; it must accept ({kind}): {exc}") from exc


def load_reward_function(spec: str | Callable) -> Callable:
    """Resolve a reward spec (see the module docstring) to a callable; RewardError on failure.

    Errors name the file and function: missing file, syntax error (with the line), import-time
    exception, missing function (listing the callables the file defines), not callable, or a
    signature that cannot take three positional arguments.
    """
    if callable(spec):
        _check_signature(spec, function_name(spec))
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise RewardError(f"reward function spec {spec!r} must be 'path/to/file.py:function_name', "
                          "'builtin:<name>' or a Python callable")
    location, _, name = spec.rpartition(":")
    if not location or not name:
        raise RewardError(f"reward function spec {spec!r} must be 'path/to/file.py:function_name'")
    if location == "builtin":
        return _builtin(name)
    path = Path(location).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    if not path.is_file():
        raise RewardError(f"reward function {spec!r}: file not found: {path}")
    module = _load_module(path, spec)
    if not hasattr(module, name):
        defined = sorted(k for k, v in vars(module).items()
                         if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == module.__name__)
        raise RewardError(f"reward function {spec!r}: {path} defines no {name!r}; callables it defines: "
                          f"{', '.join(defined) if defined else '(none)'}")
    fn = getattr(module, name)
    if not callable(fn):
        raise RewardError(f"reward function {spec!r}: {path}:{name} is a {type(fn).__name__}, not a callable")
    try:
        fn.__hybridflow_origin__ = f"{path}:{name}"
    except (AttributeError, TypeError):
        pass
    _check_signature(fn, f"{path}:{name}")
    return fn
