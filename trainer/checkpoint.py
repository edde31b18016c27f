"""Run checkpoints: atomic step directories under ``<run_dir>/checkpoints``.

Layout: ``checkpoints/step_<k>/`` holds whatever ``save_fn`` wrote (the worker groups' engine
states, in sub-directories) and ``controller.json`` (the controller's JSON state, ``step``
included). A save is built in ``checkpoints/.tmp-step_<k>`` and renamed into place only when
complete, so a crash mid-save leaves no ``step_<k>``: :meth:`CheckpointManager.latest` ignores
the leftover temporary directory and the next save deletes it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

__all__ = ["CheckpointManager", "resolve_resume", "CONTROLLER_FILE"]

CONTROLLER_FILE = "controller.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / CONTROLLER_FILE).is_file()


class CheckpointManager:
    """Save, list, prune and load the checkpoints of one run.

    ``save(step, save_fn, controller_state) -> Path`` of ``step_<k>``; ``latest() -> (step, path)
    | None``; ``load(path) -> controller_state``; ``keep_last=N`` keeps the N newest (None: all).
    """

    def __init__(self, run_dir: str | os.PathLike, keep_last: int | None = None):
        if keep_last is not None and (isinstance(keep_last, bool) or int(keep_last) < 1):
            raise ValueError(f"CheckpointManager: keep_last must be None (keep all) or >= 1, got {keep_last!r}")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.keep_last = None if keep_last is None else int(keep_last)

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as ``(step, path)``, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and _is_checkpoint(entry):
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        """``(step, path)`` of the newest complete checkpoint, or None (``.tmp-*`` dirs are ignored)."""
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, save_fn: Callable[[str], Any] | None, controller_state: dict) -> Path:
        """Write checkpoint ``step_<step>`` and return its path.

        Order: clean leftovers of crashed saves → ``save_fn(tmp_dir)`` (workers write their engine
        states under it) → ``controller.json`` (``controller_state`` plus ``step``, written
        atomically) → rename ``.tmp-step_<k>`` to ``step_<k>`` → prune beyond ``keep_last``.
        If ``save_fn`` raises, the temporary directory is removed and the error propagates;
        earlier checkpoints are untouched.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"CheckpointManager.save: step must be an int >= 0, got {step!r}")
        if not isinstance(controller_state, dict):
            raise TypeError(f"CheckpointManager.save: controller_state must be a dict, "
                            f"got {type(controller_state).__name__}")
        if "step" in controller_state and controller_state["step"] != step:
            raise ValueError(f"CheckpointManager.save: controller_state['step']={controller_state['step']!r} "
                             f"differs from step={step}")
        state = {**controller_state, "step": step}
        try:  # fail before the (expensive) worker save, not after it
            json.dumps(state, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise TypeError(f"CheckpointManager.save: controller_state is not JSON-serialisable: {err}") from err

        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_incomplete()
        final = self.root / f"step_{step}"
        tmp = self.root / f"{_TMP_PREFIX}step_{step}"
        tmp.mkdir()
        try:
            if save_fn is not None:
                save_fn(str(tmp))
            _write_json_atomic(tmp / CONTROLLER_FILE, state)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():  # re-saving a step: move the old copy aside, swap, then delete it
            old = self.root / f"{_OLD_PREFIX}step_{step}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.root)
        self._prune(keep=final)
        return final

    def clean_incomplete(self) -> list[Path]:
        """Delete ``.tmp-*``/``.old-*`` dirs left by crashed saves; returns what was removed."""
        if not self.root.is_dir():
            return []
        removed = [p for p in self.root.iterdir() if p.name.startswith((_TMP_PREFIX, _OLD_PREFIX))]
        for path in removed:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return removed

    def _prune(self, keep: Path) -> None:
        if self.keep_last is None:
            return
        others = [path for _, path in self.checkpoints() if path != keep]
        excess = len(others) + 1 - self.keep_last
        for path in others[:max(excess, 0)]:  # oldest first; the checkpoint just saved is kept
            shutil.rmtree(path)

    @staticmethod
    def load(path: str | os.PathLike) -> dict:
        """The controller state saved in checkpoint dir ``path`` (``step`` included)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {path} does not exist")
        file = path / CONTROLLER_FILE
        if not file.is_file():
            raise ValueError(f"{path} is not a checkpoint directory (no {CONTROLLER_FILE})")
        with open(file, encoding="utf-8") as f:
            return json.load(f)


def resolve_resume(resume: str | os.PathLike | None, run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from.

    ``"auto"``: the newest complete checkpoint of ``run_dir`` (None if there is none);
    ``"never"`` (or None/False): None; anything else is a path to a ``step_<k>`` checkpoint dir,
    which must exist and contain ``controller.json`` (FileNotFoundError / ValueError otherwise).
    """
    if resume is None or resume is False or resume == "never":
        return None
    if resume == "auto":
        found = CheckpointManager(run_dir).latest()
        return found[1] if found else None
    path = Path(resume).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"resume: checkpoint path {str(path)!r} does not exist "
                                "(resume takes 'auto', 'never' or a checkpoints/step_<k> directory)")
    if path.name.startswith(_TMP_PREFIX):
        raise ValueError(f"resume: {path} is an incomplete checkpoint (a save that did not finish)")
    if not _is_checkpoint(path):
        run = path.parent if path.name == "checkpoints" else path
        latest = CheckpointManager(run).latest() if path.is_dir() else None
        hint = f"; did you mean {latest[1]}?" if latest else ""
        raise ValueError(f"resume: {path} is not a checkpoint directory (no {CONTROLLER_FILE}); "
                         f"expected <run_dir>/checkpoints/step_<k>{hint}")
    return path
