"""Step-by-step turns between two training processes, so that both are timed on the same machine
state: a slow spell of a shared machine hits the step of each side in turn, not one side's run.

The controller (:class:`Turns`, in benchmarks/vs_trl.py) gives each side its turn of ``per_turn``
steps through two FIFOs in a directory named by ``HYBRIDFLOW_LOCKSTEP`` + the side's name: the side
waits for a byte on ``<side>.go`` before each step and writes one to ``<side>.done`` after it.
Turns of several steps keep the cost of the switch itself (caches, the other side's idle OpenMP
threads still spinning for a moment) out of most steps. :class:`Lockstep` is
that side's half: ``on_step_begin`` / ``on_step_end`` of a hybridflow ``trainer.callbacks`` entry
(``trainer.callbacks=[benchmarks/lockstep.py:Lockstep]``); benchmarks/trl_grpo.py calls the same
two methods from a TRL callback. Standalone: it imports nothing from hybridflow.
"""
from __future__ import annotations

import os
import select
import time

ENV = "HYBRIDFLOW_LOCKSTEP"  # "<directory>:<side>"


class Lockstep:
    """The side of a process: wait for the turn before a step, hand it back after."""

    def __init__(self):
        directory, self.side = os.environ[ENV].rsplit(":", 1)
        self.go = os.open(os.path.join(directory, f"{self.side}.go"), os.O_RDWR)
        self.done = os.open(os.path.join(directory, f"{self.side}.done"), os.O_RDWR)

    def on_step_begin(self, *_):
        os.read(self.go, 1)

    def on_step_end(self, run=None, metrics=None, final=None):
        """After a step: hand the turn back. After the last one (``final``, or a hybridflow run at
        ``trainer.steps``), wait until every side is done, so that what a side does after its
        training (saving) never runs beside the other side's timed steps."""
        os.write(self.done, b"d")
        if final is None:
            final = run is not None and run.step >= run.settings.trainer.steps
        if final:
            os.read(self.go, 1)


class Turns:
    """The controller: FIFOs for each side, then :meth:`run` alternates the turns until every side
    has made its steps (or a side's process ended)."""

    def __init__(self, directory: str, sides: tuple[str, ...]):
        os.makedirs(directory, exist_ok=True)
        self.directory, self.sides, self.fds = directory, sides, {}
        for side in sides:
            for end in ("go", "done"):
                path = os.path.join(directory, f"{side}.{end}")
                if not os.path.exists(path):
                    os.mkfifo(path)
                self.fds[side, end] = os.open(path, os.O_RDWR)

    def env(self, side: str) -> dict:
        return {ENV: f"{self.directory}:{side}"}

    def run(self, steps: int, processes: dict, per_turn: int = 1, timeout_s: float = 600.0) -> None:
        """Turns of ``per_turn`` steps each, side after side, until each side made ``steps``."""
        left = {side: steps for side in self.sides}
        while any(left.values()):
            for side in self.sides:
                turn = min(per_turn, left[side])
                if turn:
                    os.write(self.fds[side, "go"], b"g" * turn)
                    left[side] = 0 if self._wait(side, turn, processes[side], timeout_s) else left[side] - turn
        for side in self.sides:  # every side is done: release them (Lockstep.on_step_end of the last step)
            os.write(self.fds[side, "go"], b"g")

    def _wait(self, side: str, count: int, process, timeout_s: float) -> bool:
        """Wait for ``count`` steps of ``side``; True when its process ended instead."""
        deadline = time.monotonic() + timeout_s
        while count:
            ready, _, _ = select.select([self.fds[side, "done"]], [], [], 1.0)
            if ready:
                count -= len(os.read(self.fds[side, "done"], count))
                deadline = time.monotonic() + timeout_s
            elif process.poll() is not None:
                return True
            elif time.monotonic() > deadline:
                raise TimeoutError(f"lockstep: {side} did not finish a step within {timeout_s:.0f} s")
        return False
