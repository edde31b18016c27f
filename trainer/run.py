"""RLRun: the bookkeeping around a recipe's loop, so the recipe reads like the algorithm.

    run = RLRun(cfg)                          # checks the config, loads data, makes the run dir
    actor, ref, reward = build_workers(cfg, "actor", "ref", "reward")
    run.attach(actor=actor, ref=ref, reward=reward)   # resume=auto: weights, data order, step
    for batch in run.batches():               # prompts with uids; a tqdm bar shows reward, step time
        with run.stage("gen"): ...
        run.end_step(batch, metrics)          # log, validate, checkpoint
    run.finish()                              # final validation, checkpoint, reward-curve PNG

Run dir: ``config.yaml``, ``metrics.jsonl`` (one JSON object per step), ``checkpoints/step_k``,
``reward_curve.png``, tensorboard/ when enabled.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from hybridflow import DataProto
from hybridflow.config import ConfigError, require_choice
from hybridflow.workers.rollout import ROLLOUT_BACKENDS
from hybridflow.trainer.algos import ADVANTAGES, POLICY_LOSSES, agg_loss_modes, make_kl_controller
from hybridflow.trainer.checkpoint import CheckpointManager, resolve_resume
from hybridflow.trainer.data import PromptDataset, PromptLoader
from hybridflow.trainer.metrics import Timer, compute_data_metrics, compute_throughput, reduce_metrics
from hybridflow.trainer.plots import plot_curves
from hybridflow.trainer.rewards import load_reward_function
from hybridflow.trainer.rl import assign_uids
from hybridflow.trainer.tracking import METRICS_FILE, Tracker

logger = logging.getLogger("hybridflow.trainer")


def check_config(cfg) -> None:
    """Fail before any expensive work: names in registries, files that must exist, the reward
    function (loaded once here, so a syntax error or a missing function shows at once)."""
    require_choice(cfg, "executor", ("inprocess", "ray"))
    require_choice(cfg, "algorithm.adv_estimator", ADVANTAGES.names())
    require_choice(cfg, "actor.policy_loss", POLICY_LOSSES.names())
    require_choice(cfg, "actor.loss_agg_mode", agg_loss_modes())
    if OmegaConf.select(cfg, "rollout.backend") is not None:
        require_choice(cfg, "rollout.backend", ROLLOUT_BACKENDS)
    if not os.path.isdir(str(cfg.model.path)):
        raise ConfigError(f"model.path: {cfg.model.path!r} is not a directory (a local HF checkpoint)")
    for key in ("model.path", "ref.model_path", "critic.model_path", "reward.model_path", "cost.model_path",
                "cost_critic.model_path"):
        path = OmegaConf.select(cfg, key)
        if path and not os.path.isfile(os.path.join(str(path), "config.json")):
            raise ConfigError(f"{key}: {path!r} is not a Hugging Face checkpoint directory (no config.json; "
                              "expected the output of save_pretrained)")
    for key in ("data.train", "data.val"):
        path = OmegaConf.select(cfg, key)
        if path and not os.path.exists(str(path)):
            raise ConfigError(f"{key}: file not found: {path}")
    if "reward" in cfg and not (OmegaConf.select(cfg, "reward.function") or OmegaConf.select(cfg, "reward.model_path")):
        raise ConfigError("reward: set reward.function (path/to/file.py:fn or builtin:name) and/or "
                          "reward.model_path (a reward model); both are empty, so there is no reward")
    for sec in ("reward", "cost"):  # cost: Safe RLHF's cost function, loaded like the reward
        if OmegaConf.select(cfg, f"{sec}.function"):
            spec = str(cfg[sec].function)
            if ":" in spec and not spec.startswith("builtin:"):  # absolute, so Ray workers find it too
                file, name = spec.rsplit(":", 1)
                cfg[sec].function = f"{os.path.abspath(file)}:{name}"
            load_reward_function(cfg[sec].function)
    resume = cfg.trainer.get("resume", "auto")
    if resume not in (None, False, "auto", "never"):  # an explicit checkpoint path must exist now
        try:
            resolve_resume(resume, cfg.trainer.run_dir)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"trainer.resume: {str(err).removeprefix('resume: ')}") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class RLRun:
    """See the module docstring. ``cfg`` is the recipe's config (recipes/base.yaml keys)."""

    def __init__(self, cfg):
        if not logging.getLogger().handlers:  # a plain script: show the run's INFO lines
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        check_config(cfg)
        seed_everything(int(cfg.seed))
        self.cfg = cfg
        self.run_dir = Path(cfg.trainer.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, self.run_dir / "config.yaml")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(cfg.model.path))
        data = cfg.data
        options = dict(prompt_key=data.prompt_key, max_prompt_length=int(data.max_prompt_length))
        self.train_set = PromptDataset(str(data.train), self.tokenizer, **options)
        self.val_set = PromptDataset(str(data.val), self.tokenizer, **options) if data.get("val") else None
        self.loader = PromptLoader(self.train_set, int(data.batch_size), shuffle=bool(data.shuffle),
                                   seed=int(cfg.seed), total_steps=int(cfg.trainer.steps))
        self.ckpt = CheckpointManager(self.run_dir, keep_last=cfg.trainer.get("keep_last"))
        self.kl_ctrl = make_kl_controller(OmegaConf.to_container(cfg.algorithm.kl_ctrl))
        self.timer = Timer()
        self.step = 0
        self.groups: dict = {}
        self.controllers: dict = {}
        self.tracker: Tracker | None = None
        self.bar: tqdm | None = None

    # ------------------------------------------------------------------ set-up
    def attach(self, controllers: dict | None = None, **groups) -> None:
        """Remember the worker groups (for validation and checkpoints) and resume if asked.
        ``controllers``: controller-side objects with state (``state_dict()``/``load_state_dict()``,
        e.g. a Lagrange multiplier), saved in each checkpoint under their names and restored."""
        self.groups, self.controllers = groups, dict(controllers or {})
        path = resolve_resume(self.cfg.trainer.get("resume", "auto"), self.run_dir)
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
        self.tracker = Tracker(self.run_dir, backends=list(self.cfg.trainer.trackers),
                               project=self.cfg.trainer.get("project", "hybridflow"),
                               experiment=self.cfg.trainer.get("experiment"), config=self.cfg,
                               resume_step=self.step)
        if self.step == 0 and self.cfg.trainer.get("val_before_train", False):
            self.tracker.log(self.validate(), 0)

    def _stateful(self) -> dict:
        return {n: g for n, g in self.groups.items() if hasattr(g, "save_checkpoint")}

    # ------------------------------------------------------------------ loop
    def batches(self):
        """Prompt batches until ``trainer.steps``; each gets ``uid``s and ``meta_info['seed']``."""
        self.bar = tqdm(total=int(self.cfg.trainer.steps), initial=self.step, desc="steps", dynamic_ncols=True)
        for prompts in self.loader:
            self.step += 1
            assign_uids(prompts, self.step)
            prompts.meta_info.update(step=self.step, seed=int(self.cfg.seed) * 100003 + self.step)
            self._step_timer = self.timer("step")
            self._step_timer.__enter__()
            yield prompts

    def stage(self, name: str):
        """``with run.stage("gen"):`` times a stage into ``timing/gen_s``."""
        return self.timer(name)

    def end_step(self, batch: DataProto, *metric_sources) -> dict:
        """Log the step (data metrics, timings, throughput, worker metrics), validate and
        checkpoint when due. ``metric_sources``: dicts or DataProtos whose meta_info has metrics."""
        self._step_timer.__exit__(None, None, None)
        metrics = {"step": self.step, **compute_data_metrics(batch)}
        for source in (batch, *metric_sources):
            found = source.meta_info.get("metrics", {}) if isinstance(source, DataProto) else source
            metrics.update(reduce_metrics(found))
        timing = self.timer.step_metrics()
        metrics.update(timing)
        metrics.update(compute_throughput(batch, timing["timing/step_s"], int(self.cfg.world_size)))
        cfg = self.cfg.trainer
        if cfg.get("val_every") and self.step % int(cfg.val_every) == 0:
            metrics.update(self.validate())
        if cfg.get("save_every") and self.step % int(cfg.save_every) == 0:
            self.save()
        self.tracker.log(metrics, self.step)
        self.bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
                             step_s=f"{timing['timing/step_s']:.2f}")
        self.bar.update(1)
        return metrics

    def validate(self) -> dict:
        """Greedy generation on the validation set: ``val/reward/mean`` (and per data source)."""
        if self.val_set is None or "actor" not in self.groups or "reward" not in self.groups:
            return {}
        scores, sources = [], []
        size = int(self.cfg.data.get("val_batch_size", 64))
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
        for group in self.groups.values():
            group.shutdown()
        for pool in {id(g.pool): g.pool for g in self.groups.values()}.values():
            pool.shutdown()

    def finish(self) -> None:
        """Final validation and checkpoint, close trackers, draw the reward curve."""
        cfg = self.cfg.trainer
        if cfg.get("val_every") and self.step % int(cfg.val_every):
            self.tracker.log(self.validate(), self.step)
        if cfg.get("save_every") and self.step % int(cfg.save_every):
            self.save()
        if cfg.get("export_hf") and "actor" in self.groups:
            self.groups["actor"].export_hf(str(self.run_dir / "hf"))
        self.tracker.close()
        if self.bar is not None:
            self.bar.close()
        if cfg.get("plot", True):
            keys = ["reward/mean"] + (["val/reward/mean"] if self.val_set is not None and cfg.get("val_every") else [])
            try:
                path = plot_curves(self.run_dir, keys=keys, out="reward_curve.png")
                logger.info("reward curve: %s", path)
            except ValueError as err:  # e.g. no steps were run
                logger.warning("no reward curve drawn: %s", err)
