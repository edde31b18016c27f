"""Configs: YAML files (omegaconf) + command-line overrides, validated against the YAML itself.

    cfg = load_config("recipes/grpo.yaml", ["actor.lr=1e-5", "data.train=my.parquet"])

- A YAML may start from others: ``defaults: [base.yaml]`` (paths relative to the file), merged
  in order, then the file's own keys on top.
- The merged YAML is the schema: an override of a key that does not exist is a
  :class:`ConfigError` listing the nearest valid keys (prefix ``+`` to add a new key on
  purpose: ``+trainer.notes=baseline``); a value that cannot take the type of the default
  (``actor.lr=fast``) is an error too.
- ``--config PATH`` on the command line replaces the default YAML.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from typing import Any, Iterable

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it."""


def _load_yaml(path: str, seen: tuple = ()) -> DictConfig:
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"config file {path} includes itself through 'defaults'")
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    bases = cfg.pop("defaults", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged = OmegaConf.create({})
    for base in bases:
        base_path = os.path.join(os.path.dirname(path), str(base))
        if not os.path.isfile(base_path):
            raise ConfigError(f"config file {path}: its 'defaults' entry {str(base)!r} was not found at {base_path}")
        merged = OmegaConf.merge(merged, _load_yaml(base_path, seen + (path,)))
    return OmegaConf.merge(merged, cfg)


def all_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Dotted names of every leaf and node of a config."""
    keys = []
    if isinstance(cfg, DictConfig):
        for key in cfg.keys():
            name = f"{prefix}{key}"
            keys.append(name)
            keys.extend(all_keys(cfg._get_node(key), name + "."))
    return keys


def _coerce(default: Any, value: Any, key: str) -> Any:
    """Give an override the type of the default it replaces (YAML reads ``1e-5`` as a string)."""
    if isinstance(default, (DictConfig, dict)) and not isinstance(value, dict):
        raise ConfigError(f"config key {key!r} is a section; set its keys instead (e.g. {key}.<name>=...)")
    if default is None or value is None or isinstance(default, (DictConfig, ListConfig, dict, list)):
        return value
    if isinstance(default, str) and isinstance(value, (list, ListConfig)):
        return value  # a key that takes a name or a list (lora.target_modules): the settings' types decide
    return _scalar(type(default), value, key, f" (the default is {default!r})")


def _scalar(kind: type, value: Any, key: str, note: str = "") -> Any:
    """``value`` as ``kind`` (bool, int, float or str): ``2.0`` is an int, ``"1e-5"`` a float,
    ``yes``/``no`` a bool, but ``true`` is not a number and ``1.5`` not an int."""
    if isinstance(value, bool) and kind in (int, float):
        raise ConfigError(f"config key {key!r}: {value!r} is not a valid {kind.__name__}{note}")
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    try:
        if kind is bool:
            text = str(value).lower()
            if text in ("true", "1", "yes"):
                return True
            if text in ("false", "0", "no"):
                return False
            raise ValueError
        if kind is float:
            return float(value)
        if kind is int:
            as_float = float(value)
            if as_float != int(as_float):
                raise ValueError
            return int(as_float)
        if kind is str and not isinstance(value, (dict, list, DictConfig, ListConfig)):
            return str(value)
    except (TypeError, ValueError, OverflowError):
        pass
    raise ConfigError(f"config key {key!r}: {value!r} is not a valid {kind.__name__}{note}")


_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _parse_value(raw: str) -> Any:
    """A command-line value read as YAML, with ``1e-5`` a float as omegaconf reads it in files."""
    if raw == "":
        return ""
    value = yaml.safe_load(raw)
    return float(value) if isinstance(value, str) and _SCIENTIFIC.match(value) else value


def apply_overrides(cfg: DictConfig, overrides: Iterable[str], source: str = "command line") -> DictConfig:
    """Apply ``key=value`` overrides to ``cfg`` (validated; see module docstring)."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    for item in overrides:
        known = all_keys(cfg)
        if "=" not in item:
            raise ConfigError(f"override {item!r} ({source}) must look like key=value")
        key, raw = item.split("=", 1)
        add = key.startswith("+")
        key = key.lstrip("+")
        value = _parse_value(raw)
        if not add and key not in known:
            raise ConfigError(unknown_key_message(key, known, source))
        if not add:
            value = _coerce(OmegaConf.select(cfg, key), value, key)
        OmegaConf.update(cfg, key, value, force_add=add)
    return cfg


def unknown_key_message(key: str, known: list[str], source: str) -> str:
    nearest = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = [k for k in known if k.startswith(parent + ".") and "." not in k[len(parent) + 1:]] if parent \
        else [k for k in known if "." not in k]
    msg = f"unknown config key {key!r} ({source})."
    if nearest:
        msg += f" Did you mean: {', '.join(nearest)}?"
    if siblings:
        msg += f" Valid keys{' under ' + repr(parent) if parent else ''}: {', '.join(siblings)}."
    return msg + " Prefix the key with '+' to add a new one."


def load_config(path: str | None = None, overrides: Iterable[str] = (), *, base: dict | None = None) -> DictConfig:
    """Load a YAML (or start from ``base``) and apply validated overrides."""
    cfg = _load_yaml(path) if path else OmegaConf.create(base or {})
    return apply_overrides(cfg, list(overrides))


def parse_cli(argv: list[str], default_config: str) -> DictConfig:
    """``[--config PATH] key=value ...`` → validated config (what recipes call on sys.argv[1:])."""
    argv, path = list(argv), default_config
    for i, item in enumerate(argv):
        if item.startswith("--config="):
            argv[i:i + 1] = ["--config", item.split("=", 1)[1]]
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a path")
        path = argv[i + 1]
        del argv[i:i + 2]
    for item in argv:
        if item.startswith("-") and not item.startswith("+"):
            raise ConfigError(f"unknown option {item!r}; use key=value overrides or --config PATH")
    cfg = load_config(path, argv)
    if os.path.abspath(path) != os.path.abspath(default_config) and os.path.isfile(default_config):
        check_keys(_load_yaml(path), _load_yaml(default_config), path, default_config)
    return cfg


def check_keys(cfg: DictConfig, schema: DictConfig, source: str, schema_source: str) -> None:
    """Every key of ``cfg`` (a user's ``--config`` file) must exist in ``schema`` (the recipe's own
    YAML), so a typo in a file fails like a typo on the command line. Below a key whose default is
    ``null`` or ``{}`` anything goes (free-form sections)."""
    known = set(all_keys(schema))
    free = {k for k in known if OmegaConf.select(schema, k) is None
            or (isinstance(OmegaConf.select(schema, k), DictConfig) and not OmegaConf.select(schema, k))}
    for key in all_keys(cfg):
        parts = key.split(".")
        if key in known or any(".".join(parts[:i]) in free for i in range(1, len(parts))):
            continue
        msg = unknown_key_message(key, sorted(known), source)
        raise ConfigError(msg.replace("Prefix the key with '+' to add a new one.",
                                      f"The recipe's config {schema_source} has no such key; to add a new one, "
                                      f"pass it on the command line as +{key}=..."))


def require_choice(cfg: DictConfig, key: str, choices: Iterable[str]) -> str:
    """The value at ``key`` if it is one of ``choices``, else a ConfigError naming the key."""
    value, choices = OmegaConf.select(cfg, key), list(choices)
    if value not in choices:
        nearest = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean {nearest[0]!r}?" if nearest else ""
        raise ConfigError(f"config key {key!r}: {value!r} is not one of {choices}.{hint}")
    return value


# ------------------------------------------------------------------ typed settings
def collect() -> Any:
    """A dataclass field that takes the keys of its section that are no field (see :func:`bind`)."""
    return dataclasses.field(default_factory=dict, metadata={"collect": True})


def bind(cls: type, node: Any, key: str = "") -> Any:
    """The config section ``node`` (DictConfig or dict) as an instance of the dataclass ``cls``.

    Every field must be in ``node`` unless it has a default (the YAML holds the defaults; a field
    default only marks an optional section, ``None`` = absent), and every key of ``node`` must be
    a field, except that a :func:`collect` field takes the keys that are not. Values take the
    field's type: ``int``, ``float``, ``bool``, ``str``, ``Literal[...]`` (a choice),
    ``Optional[...]``, ``list``, ``dict`` and nested dataclasses. Errors are :class:`ConfigError`
    naming the dotted key (``actor.lr``) and, for an unknown key, the nearest valid ones."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if node is None:
        node = {}
    if not isinstance(node, dict):
        raise ConfigError(f"config key {key!r} must be a section (a mapping of keys), got {node!r}")
    dotted = (lambda name: f"{key}.{name}" if key else str(name))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    collector = next((n for n, f in fields.items() if f.metadata.get("collect")), None)
    values: dict = {collector: {}} if collector else {}
    for name, value in node.items():
        if name in fields and name != collector:
            values[name] = convert(hints[name], value, dotted(name))
        elif collector is not None:
            values[collector][name] = value
        else:
            known = [dotted(n) for n in fields if n != collector]
            raise ConfigError(unknown_key_message(dotted(name), known, "config").replace(
                " Prefix the key with '+' to add a new one.", ""))
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key {dotted(name)!r} is missing: set it, or start the config from a "
                              "recipe's YAML (defaults: [grpo.yaml]), which holds every default")
    return cls(**values)


def convert(tp: Any, value: Any, key: str) -> Any:
    """``value`` as the type ``tp`` (see :func:`bind`), or a ConfigError naming ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:
            try:
                return convert(option, value, key)
            except ConfigError:
                pass
        return convert(options[-1], value, key)
    if origin is typing.Literal:
        if value in args:
            return value
        nearest = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" Did you mean {nearest[0]!r}?" if nearest else ""
        raise ConfigError(f"config key {key!r}: {value!r} is not one of {list(args)}.{hint}")
    if dataclasses.is_dataclass(tp):
        return bind(tp, value, key)
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: {value!r} is not a list")
        items = [convert(args[0] if args else Any, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} is a section (a mapping of keys), got {value!r}")
        return dict(value)
    if tp in (bool, int, float, str):
        if value is None:
            raise ConfigError(f"config key {key!r} cannot be null (it takes a {tp.__name__})")
        return _scalar(tp, value, key)
    raise TypeError(f"bind: config key {key!r} has a field type {tp!r} that bind() does not know")
