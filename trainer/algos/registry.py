"""A tiny name -> function registry, shared by every algorithm table in ``trainer/algos``.

A config names an algorithm piece by string (``algorithm.adv_estimator: grpo``); the registry
turns the string into the function and, on a typo, answers with the available names and the
closest matches instead of a bare ``KeyError``::

    ADVANTAGES = Registry("advantage estimator")

    @ADVANTAGES.register("my_adv")
    def my_adv(token_level_rewards, response_mask, **cfg): ...

    ADVANTAGES.get("my_adv")      # -> my_adv
    ADVANTAGES.get("my_ad")       # RegistryKeyError: unknown advantage estimator 'my_ad'.
                                  #   Did you mean 'my_adv'? Available: ...
    ADVANTAGES.resolve("my_file.py:my_adv")   # a function named by file (or module) and name
    ADVANTAGES.portable("my_adv")             # "/abs/my_file.py:my_adv": resolvable in any process

A config may name a piece by registry name or by spec (``path/to/file.py:fn``, ``module:fn``,
see :mod:`hybridflow.imports`). Workers are other processes that never ran the controller's script,
so the controller hands them :meth:`Registry.portable` names: built-in names as they are, a
function the user registered as the spec of the file or module that defines it.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Callable, Dict, Iterator, List, Optional, TypeVar

from hybridflow.imports import is_spec, load_object, portable_spec

F = TypeVar("F", bound=Callable)

__all__ = ["Registry", "RegistryKeyError", "accepted_options"]


class RegistryKeyError(KeyError, ValueError):
    """Unknown registry name.

    Subclasses both ``KeyError`` (it is a failed lookup) and ``ValueError`` (it usually comes
    from a bad config value), so callers may catch either. ``str()`` gives the plain message
    (``KeyError`` alone would wrap it in quotes).
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # KeyError.__str__ would repr() the message
        return self.message


class Registry:
    """Maps names to functions for one kind of algorithm piece.

    Args:
        kind: human-readable name of what is registered (used in error messages),
            e.g. ``"advantage estimator"``.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Callable] = {}

    def register(self, name: str, fn: Optional[Callable] = None, *, override: bool = False):
        """Register ``fn`` under ``name``; usable as ``@registry.register("name")``.

        Registering an existing name raises ``ValueError`` unless ``override=True`` (so two
        modules cannot silently shadow each other). The function is returned unchanged, so
        decorators can be stacked to register aliases.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def _add(f: F) -> F:
            if not callable(f):
                raise TypeError(f"{self.kind} {name!r} must be callable, got {type(f).__name__}")
            if name in self._entries and not override and self._entries[name] is not f:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered "
                    f"(by {_qualname(self._entries[name])}); pass override=True to replace it"
                )
            self._entries[name] = f
            return f

        return _add if fn is None else _add(fn)

    def unregister(self, name: str) -> Callable:
        """Remove ``name`` and return its function (raises like :meth:`get` if absent)."""
        fn = self.get(name)
        del self._entries[name]
        return fn

    def get(self, name: str) -> Callable:
        """Return the function registered as ``name``.

        Raises:
            RegistryKeyError: (a ``KeyError`` and a ``ValueError``) naming the closest matches
                and listing every registered name.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            pass
        available = self.names()
        close = difflib.get_close_matches(str(name), available, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise RegistryKeyError(
            f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(available) or '(none)'}"
        )

    def resolve(self, name_or_spec: str) -> Callable:
        """:meth:`get` for a registered name; for a spec (``file.py:fn`` / ``module:fn``) the
        registered function defined there, else the function loaded from it."""
        if not is_spec(name_or_spec):
            return self.get(name_or_spec)
        for fn in self._entries.values():
            if portable_spec(fn) == name_or_spec:
                return fn
        fn = load_object(name_or_spec, what=self.kind, error=RegistryKeyError)
        if not callable(fn):
            raise RegistryKeyError(f"{self.kind} {name_or_spec!r} is a {type(fn).__name__}, not a function")
        return fn

    def portable(self, name_or_spec: str) -> str:
        """What a worker process can :meth:`resolve`: a spec or a built-in name as it is (its module
        registers it on import), a name the user registered as the spec of its definition.
        A function no other process can load (typed into a REPL) keeps its name."""
        if is_spec(name_or_spec):
            return name_or_spec
        fn = self.get(name_or_spec)
        if getattr(fn, "__module__", "").startswith("hybridflow."):
            return name_or_spec
        return portable_spec(fn) or name_or_spec

    def names(self) -> List[str]:
        """Sorted list of registered names."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"


def accepted_options(fn: Callable, options: Dict[str, object]) -> Dict[str, object]:
    """The ``options`` that ``fn`` takes: all of them when it has ``**kwargs``, else those it
    names (so a user's loss may leave out the clip settings it does not use)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(options)
    return {k: v for k, v in options.items() if k in params}


def _qualname(fn: Callable) -> str:
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}"
