"""RLRun: the bookkeeping around a recipe's loop, so the recipe reads like the algorithm.

    run = RLRun(cfg)                          # typed settings (checked), data, run dir
    actor, ref, reward = build_workers(run.settings, "actor", "ref", "reward")
    run.attach(actor=actor, ref=ref, reward=reward)   # resume=auto: weights, data order, step
    for step in run.steps():                  # until trainer.steps; a tqdm bar shows reward, step time
        with step.stage("gen"):               # timing/gen_s
            batch = actor.generate(step.prompts)
        ...
        step.log(batch, metrics)              # then: metrics line, validation, checkpoint
    run.finish()                              # final validation, checkpoint, reward-curve PNG

Run dir: ``config.yaml``, ``metrics.jsonl`` (one JSON object per step), ``checkpoints/step_k``,
``reward_curve.png``, tensorboard/ when enabled.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from hybridflow import DataProto
from hybridflow.imports import load_object
from hybridflow.worker import WORKER_PROCESS_ENV
from hybridflow.trainer.algos import make_kl_controller
from hybridflow.trainer.checkpoint import CheckpointManager, resolve_resume
from hybridflow.trainer.data import PromptDataset, PromptLoader
from hybridflow.trainer.metrics import Timer, compute_data_metrics, compute_throughput, reduce_metrics
from hybridflow.trainer.plots import plot_curves
from hybridflow.trainer.rl import assign_uids
from hybridflow.trainer.settings import RLSettings, rl_settings
from hybridflow.trainer.tracking import METRICS_FILE, Tracker

logger = logging.getLogger("hybridflow.trainer")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prompt_seed(seed: int, step: int, round_: int = 1) -> int:
    """The sampling seed of a step's prompts (round > 1: the extra prompts of that step)."""
    return seed * 100003 + step + (1_000_003 * round_ if round_ > 1 else 0)


class Step:
    """One training step of :meth:`RLRun.steps`: ``number``, ``prompts`` (``data.batch_size``
    prompts with ``uid``s and ``meta_info['seed']``), :meth:`stage` timers, :meth:`more_prompts`
    and :meth:`log`, which every step must call once."""

    def __init__(self, run: "RLRun", number: int):
        self.run, self.number, self.rounds = run, number, 1
        self.prompts = run._draw(number, 1)
        self.logged: tuple | None = None

    def stage(self, name: str):
        """``with step.stage("gen"):`` times a stage into ``timing/gen_s`` (a stage timed twice adds up)."""
        return self.run.timer(name)

    def more_prompts(self) -> DataProto:
        """The next prompts of the data order, for another round of this step (DAPO's dynamic
        sampling): their own uids and seed; a resumed run draws the same ones."""
        self.rounds += 1
        return self.run._draw(self.number, self.rounds)

    def log(self, batch: DataProto, *metric_sources) -> None:
        """The step's result: ``batch`` (its data metrics) and dicts or DataProtos whose
        ``meta_info['metrics']`` to log. Logging, validation and the checkpoint follow when the
        loop body ends (outside ``timing/step_s``)."""
        if self.logged is not None:
            raise RuntimeError(f"step {self.number}: step.log(...) was called twice")
        self.logged = (batch, metric_sources)


class RLRun:
    """See the module docstring. ``cfg``: the recipe's config (recipes/base.yaml keys), resolved
    by :func:`~hybridflow.trainer.settings.rl_settings` into :attr:`settings`; :attr:`cfg` is a
    copy with the reward functions' paths made absolute (what ``config.yaml`` holds)."""

    def __init__(self, cfg):
        if os.environ.get(WORKER_PROCESS_ENV):
            raise RuntimeError("a worker process started a run: it imported a script (named in the config, e.g. "
                               "actor.policy_loss: my_script.py:fn) that starts its run when imported; put the "
                               "script's run under `if __name__ == \"__main__\":`")
        if not logging.getLogger().handlers:  # a plain script: show the run's INFO lines
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.settings: RLSettings = rl_settings(cfg)
        s = self.settings
        self.cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        for name in ("reward", "cost"):
            if getattr(s, name) is not None and name in self.cfg:
                self.cfg[name].function = getattr(s, name).function
        seed_everything(s.seed)
        self.run_dir = Path(s.trainer.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.cfg, self.run_dir / "config.yaml")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(s.model.path)
        options = dict(prompt_key=s.data.prompt_key, max_prompt_length=s.data.max_prompt_length)
        self.train_set = PromptDataset(s.data.train, self.tokenizer, **options)
        self.val_set = PromptDataset(s.data.val, self.tokenizer, **options) if s.data.val else None
        self.loader = PromptLoader(self.train_set, s.data.batch_size, shuffle=s.data.shuffle, seed=s.seed)
        self.ckpt = CheckpointManager(self.run_dir, keep_last=s.trainer.keep_last)
        self.kl_ctrl = make_kl_controller(dataclasses.asdict(s.algorithm.kl_ctrl))
        self.timer = Timer()
        self.step = 0
        self.groups: dict = {}
        self.controllers: dict = {}
        self.tracker: Tracker | None = None
        self.bar: tqdm | None = None
        self._started: float | None = None
        self.callbacks = [load_object(spec, what="trainer.callbacks")() for spec in s.trainer.callbacks]

    # ------------------------------------------------------------------ set-up
    def attach(self, controllers: dict | None = None, **groups) -> None:
        """Remember the worker groups (for validation and checkpoints) and resume if asked.
        ``controllers``: controller-side objects with state (``state_dict()``/``load_state_dict()``,
        e.g. a Lagrange multiplier), saved in each checkpoint under their names and restored."""
        self.groups = {name: group for name, group in groups.items() if group is not None}  # None: not built
        self.controllers = dict(controllers or {})
        trainer = self.settings.trainer
        path = resolve_resume(trainer.resume, self.run_dir)
        if path is not None:
            state = self.ckpt.load(path)
            for name, group in self._stateful().items():
                group.load_checkpoint(str(path / name))
            self.loader.load_state_dict(state["loader"])
            self.kl_ctrl.value = float(state["kl_coef"])
            for name, ctrl in self.controllers.items():
                if name not in state.get("controllers", {}):
                    raise ValueError(f"resume: {path} holds no state for the controller {name!r}")
                ctrl.load_state_dict(state["controllers"][name])
            self.step = int(state["step"])
            logger.info("resumed from %s (step %d)", path, self.step)
        elif (self.run_dir / METRICS_FILE).exists():
            logger.warning("starting a fresh run in %s: the old %s is replaced", self.run_dir, METRICS_FILE)
            (self.run_dir / METRICS_FILE).unlink()
        self.tracker = Tracker(self.run_dir, backends=trainer.trackers, project=trainer.project,
                               experiment=trainer.experiment, config=self.cfg, resume_step=self.step)
        if self.step == 0 and trainer.val_before_train:
            self.tracker.log(self.validate(), 0)

    def _stateful(self) -> dict:
        """The groups with state to checkpoint, each once (a group may serve two roles: LoRA's
        actor is also the reference)."""
        seen, out = set(), {}
        for name, group in self.groups.items():
            if hasattr(group, "save_checkpoint") and id(group) not in seen:
                seen.add(id(group))
                out[name] = group
        return out

    # ------------------------------------------------------------------ loop
    def steps(self):
        """The training steps, until ``trainer.steps`` (:class:`Step` each, timed as
        ``timing/step_s``); after each step's body: :meth:`end_step` with what it logged."""
        self.bar = tqdm(total=self.settings.trainer.steps, initial=self.step, desc="steps", dynamic_ncols=True)
        self._started = time.perf_counter()
        while self.step < self.settings.trainer.steps:
            self.step += 1
            self._call_back("on_step_begin", self.step)
            step = Step(self, self.step)
            with self.timer("step"):
                yield step
            if step.logged is None:
                raise RuntimeError(f"step {step.number} ended without step.log(batch, *metrics); every step logs "
                                   "its batch (even a step that makes no update)")
            batch, sources = step.logged
            self.end_step(batch, *sources)

    def _call_back(self, event: str, *args) -> None:
        """``trainer.callbacks``: ``on_step_begin(run, step)`` before a step draws its prompts (outside
        ``timing/step_s``), ``on_step_end(run, metrics)`` after its metrics are logged."""
        for callback in self.callbacks:
            if hasattr(callback, event):
                getattr(callback, event)(self, *args)

    def _draw(self, step: int, round_: int) -> DataProto:
        prompts = self.loader.next_batch()
        assign_uids(prompts, step if round_ == 1 else f"{step}.{round_}")
        prompts.meta_info.update(step=step, seed=prompt_seed(self.settings.seed, step, round_))
        return prompts

    def end_step(self, batch: DataProto, *metric_sources) -> dict:
        """Log the step (data metrics, timings, throughput, worker metrics), validate and
        checkpoint when due. ``metric_sources``: dicts or DataProtos whose meta_info has metrics."""
        metrics = {"step": self.step, **compute_data_metrics(batch)}
        for source in (batch, *metric_sources):
            found = source.meta_info.get("metrics", {}) if isinstance(source, DataProto) else source
            metrics.update(reduce_metrics(found))
        timing = self.timer.step_metrics()
        metrics.update(timing)
        metrics.update(compute_throughput(batch, timing["timing/step_s"], self.settings.world_size))
        trainer = self.settings.trainer
        if trainer.val_every and self.step % trainer.val_every == 0:
            metrics.update(self.validate())
        if trainer.save_every and self.step % trainer.save_every == 0:
            self.save()
        now = time.perf_counter()
        metrics["timing/elapsed_s"] = now - (self._started or now)  # since this process's first step began
        self.tracker.log(metrics, self.step)
        self._call_back("on_step_end", metrics)
        self.bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
                             step_s=f"{timing['timing/step_s']:.2f}")
        self.bar.update(1)
        return metrics

    def validate(self) -> dict:
        """Greedy generation on the validation set: ``val/reward/mean`` (and per data source)."""
        if self.val_set is None or "actor" not in self.groups or "reward" not in self.groups:
            return {}
        scores, sources = [], []
        size = self.settings.data.val_batch_size
        for start in range(0, len(self.val_set), size):
            prompts = self.val_set.collate([self.val_set[i] for i in range(start, min(start + size, len(self.val_set)))])
            prompts.meta_info.update(n=1, do_sample=False)
            out = self.groups["actor"].generate(prompts)
            out.union(self.groups["reward"].compute_rewards(out))
            scores.append(out.batch["token_level_scores"].sum(-1))
            sources.extend(out.non_tensor_batch["data_source"])
        scores = torch.cat(scores)
        metrics = {"val/reward/mean": float(scores.mean())}
        for source in sorted(set(sources)):
            pick = torch.tensor([s == source for s in sources])
            metrics[f"val/{source}/reward/mean"] = float(scores[pick].mean())
        return metrics

    def save(self) -> Path:
        """Checkpoint every stateful group (actor, critic) plus the controller's state."""
        def save_fn(tmp: str) -> None:
            for name, group in self._stateful().items():
                group.save_checkpoint(os.path.join(tmp, name))

        state = {"step": self.step, "loader": self.loader.state_dict(), "kl_coef": self.kl_ctrl.value}
        if self.controllers:
            state["controllers"] = {name: ctrl.state_dict() for name, ctrl in self.controllers.items()}
        return self.ckpt.save(self.step, save_fn, state)

    def close(self) -> None:
        """Stop the worker groups (Ray processes) and release their pools (idempotent). ``finish``
        leaves them running so that a caller can still use them; a script's exit stops them too."""
        for group in {id(g): g for g in self.groups.values()}.values():
            group.shutdown()
        for pool in {id(g.pool): g.pool for g in self.groups.values()}.values():
            pool.shutdown()

    def finish(self) -> "RLRun":
        """Final validation and checkpoint, close trackers, draw the reward curve; returns the run."""
        trainer = self.settings.trainer
        if trainer.val_every and self.step % trainer.val_every:
            self.tracker.log(self.validate(), self.step)
        if trainer.save_every and self.step % trainer.save_every:
            self.save()
        if trainer.export_hf and "actor" in self.groups:
            self.groups["actor"].export_hf(str(self.run_dir / "hf"))
        self.tracker.close()
        if self.bar is not None:
            self.bar.close()
        if trainer.plot:
            keys = ["reward/mean"] + (["val/reward/mean"] if self.val_set is not None and trainer.val_every else [])
            try:
                path = plot_curves(self.run_dir, keys=keys, out="reward_curve.png")
                logger.info("reward curve: %s", path)
            except ValueError as err:  # e.g. no steps were run
                logger.warning("no reward curve drawn: %s", err)
        return self
