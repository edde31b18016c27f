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

import inspect
from pathlib import Path
from typing import Callable

from hybridflow.imports import load_file

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
    module = load_file(path, spec, "reward function", RewardError)
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
