"""Experiment tracking: one ``Tracker`` fans each step's metrics out to the chosen backends.

Contract (DESIGN.md "Metrics"): the ``jsonl`` backend appends ONE JSON object per step to
``<run_dir>/metrics.jsonl``, ``step`` included, flushed at once; values are plain numbers, and NaN
or infinite values are written as ``null``. Other backends: ``console`` (one line through
``logging``), ``tensorboard`` (``<run_dir>/tensorboard``), ``wandb`` and ``mlflow`` (optional
packages, ``pip install hybridflow[tracking]``).
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

__all__ = ["Tracker", "read_metrics", "BACKENDS", "METRICS_FILE"]

logger = logging.getLogger("hybridflow.trainer")
METRICS_FILE = "metrics.jsonl"
BACKENDS = ("console", "jsonl", "tensorboard", "wandb", "mlflow")
_CONSOLE_KEYS = ("reward/mean", "response_length/mean", "actor/kl_ref", "actor/pg_loss",
                 "critic/vf_loss", "timing/step_s", "throughput/tokens_per_s")


def _require(module: str, backend: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"tracking backend {backend!r} needs the {package!r} package, which is not "
                          f"installed: pip install hybridflow[tracking]  (or: pip install {package})") from err


def _plain(name: str, value: Any) -> Any:
    """A JSON-able scalar: int/float/bool/str, with NaN and +-inf as None."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if int(np.prod(value.shape)) == 1:
            value = value.reshape(()).item() if isinstance(value, np.ndarray) else value.item()
        else:
            raise TypeError(f"Tracker.log: metric {name!r} is an array of shape {tuple(value.shape)}; "
                            "log scalars (use hybridflow.trainer.metrics.reduce_metrics)")
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(f"Tracker.log: metric {name!r} has unsupported value {value!r} of type "
                    f"{type(value).__name__}; log numbers (lists: use reduce_metrics)")


def _numeric(row: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def _config_dict(config: Any) -> dict:
    if config is None:
        return {}
    if not isinstance(config, Mapping):  # an omegaconf DictConfig
        from omegaconf import OmegaConf
        return OmegaConf.to_container(config, resolve=True)
    return dict(config)


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of ``<run_dir>/metrics.jsonl`` in file order (``null`` stays ``None``). A truncated
    last line (a crash mid-write) is skipped with a warning; a corrupt earlier line raises."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"read_metrics: no {METRICS_FILE} in {run_dir} (has the run logged a step?)")
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                logger.warning("read_metrics: skipping truncated last line of %s", path)
                continue
            raise ValueError(f"read_metrics: {path} line {i + 1} is not valid JSON: {err}") from err
    return rows


class _Jsonl:
    def __init__(self, run_dir: Path, resume_step: int | None, **_: Any):
        self.path = run_dir / METRICS_FILE
        if self.path.exists():
            if resume_step is None:
                logger.warning("%s already exists and no resume_step was given; appending to it", self.path)
            else:
                kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
                tmp = self.path.with_name(METRICS_FILE + ".tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
                os.replace(tmp, self.path)
        self.file = open(self.path, "a", encoding="utf-8")

    def log(self, row: dict, step: int) -> None:
        self.file.write(json.dumps(row, allow_nan=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class _Console:
    def __init__(self, **_: Any):
        pass

    def log(self, row: dict, step: int) -> None:
        shown = [f"{k} {row[k]:.4g}" for k in _CONSOLE_KEYS
                 if isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)]
        rest = len(row) - 1 - len(shown)
        logger.info("step %d | %s%s", step, " | ".join(shown), f" | +{rest} more" if rest > 0 else "")

    def close(self) -> None:
        pass


class _Tensorboard:
    def __init__(self, run_dir: Path, config: dict, **_: Any):
        _require("tensorboard", "tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if config:
            text = "\n".join(f"    {k}: {v}" for k, v in _flatten(config).items())
            self.writer.add_text("config", text, 0)

    def log(self, row: dict, step: int) -> None:
        for key, value in _numeric(row).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run_dir: Path, project: str, experiment: str | None, config: dict, **_: Any):
        wandb = _require("wandb", "wandb", "wandb")
        self.run = wandb.init(project=project, name=experiment, config=config, dir=str(run_dir))

    def log(self, row: dict, step: int) -> None:
        self.run.log(_numeric(row), step=step)

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    def __init__(self, project: str, experiment: str | None, config: dict, **_: Any):
        self.mlflow = _require("mlflow", "mlflow", "mlflow")
        self.mlflow.set_experiment(project)
        self.mlflow.start_run(run_name=experiment)
        if config:  # mlflow caps a param value at 500 characters
            self.mlflow.log_params({k: str(v)[:500] for k, v in _flatten(config).items()})

    def log(self, row: dict, step: int) -> None:
        self.mlflow.log_metrics(_numeric(row), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


_FACTORIES = {"console": _Console, "jsonl": _Jsonl, "tensorboard": _Tensorboard,
              "wandb": _Wandb, "mlflow": _Mlflow}


class Tracker:
    """Send each step's metrics to several backends.

    ``Tracker(run_dir, backends=("console", "jsonl"), project=..., experiment=..., config=...,
    resume_step=None)``; ``log(metrics, step)``; ``close()`` (also a context manager). With
    ``resume_step=k`` the rows of metrics.jsonl with ``step > k`` are dropped first, so a resumed
    run does not duplicate the steps it repeats. All backend names are checked (unknown name,
    package missing) before any backend starts.
    """

    def __init__(self, run_dir: str | os.PathLike, backends: Sequence[str] = ("console", "jsonl"),
                 project: str = "hybridflow", experiment: str | None = None, config: Any = None,
                 resume_step: int | None = None):
        if isinstance(backends, str):
            backends = [backends]
        backends = list(dict.fromkeys(backends))
        unknown = [b for b in backends if b not in _FACTORIES]
        if unknown:
            raise ValueError(f"Tracker: unknown tracking backend(s) {unknown}; valid: {list(BACKENDS)}")
        for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow")):
            if name in backends:
                _require(module, name, module)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        options = dict(run_dir=self.run_dir, project=project, experiment=experiment,
                       config=_config_dict(config), resume_step=resume_step)
        self._backends: dict[str, Any] = {}
        self._closed = False
        try:
            for name in backends:
                self._backends[name] = _FACTORIES[name](**options)
        except BaseException:
            self.close()
            raise

    @property
    def backends(self) -> list[str]:
        return list(self._backends)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log one step. Values must be scalars (numbers, 1-element tensors/arrays, str, None)."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"Tracker.log: step must be an int, got {step!r}")
        if self._closed:
            raise RuntimeError("Tracker.log: the tracker is closed")
        row = {"step": int(step)}
        row.update({str(k): _plain(str(k), v) for k, v in metrics.items() if k != "step"})
        for backend in self._backends.values():
            backend.log(row, int(step))

    def close(self) -> None:
        """Flush and close every backend (safe to call twice)."""
        backends, self._backends, self._closed = self._backends, {}, True
        for backend in backends.values():
            backend.close()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
