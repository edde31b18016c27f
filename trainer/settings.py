"""Typed run settings: a recipe's YAML resolved once, on the controller, into one small dataclass
per role; each worker receives only its own part (and the few facts it needs, computed here).

    cfg = parse_cli(argv, "recipes/grpo.yaml")   # merged YAML + overrides (hybridflow/config.py)
    s = rl_settings(cfg)                          # typed and checked: s.actor.lr is a float
    s.actor, s.rollout, s.optimizer_steps(s.actor)   # what the actor worker gets

The YAML holds every default (``recipes/base.yaml``, ``sft.yaml``, ``reward_model.yaml``); these
classes hold the types and the checks (each key's meaning: docs/config.md). A key the config lacks
is an error, and so is a key a class does not know (with the nearest names). :func:`rl_settings`
also checks, before any worker starts, what the config alone shows: registry names or specs
(``path/to/file.py:fn``, ``module:fn``) of the estimator, loss, KL and aggregation, the options
each of them takes, the paths that must exist and the reward function. It never changes ``cfg``:
resolved values (absolute paths, the vLLM context length, a user's loss as a spec its workers can
import) live in the settings only.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional

from omegaconf import DictConfig, OmegaConf

from hybridflow.config import ConfigError, bind, collect, unknown_key_message
from hybridflow.imports import load_object

# Names of the config contract; workers/ maps each to its implementation (a test checks they agree).
ROLLOUT_BACKENDS = ("hf", "static", "vllm")
TRAIN_BACKENDS = ("fsdp", "megatron")
_settings = dataclass(frozen=True, kw_only=True)  # every section: keyword-only, immutable


# ------------------------------------------------------------------ engines (trained or frozen models)
@_settings
class MegatronLayout:
    """``backend: megatron`` only; dp = world_size / (tp · pp). Other keys of the section go to
    the megatron engine as they are (``+actor.megatron.overlap_grad_reduce=true``)."""
    tp: int
    pp: int
    use_distributed_optimizer: bool
    reshard: Optional[Literal["micro_dp", "naive"]] = None   # actor only: weights for generation
    options: Dict[str, Any] = collect()


@_settings
class LoraSettings:
    """LoRA adapters on a trained model (the ``lora`` extra, ``peft``); ``rank`` 0 is full fine-tuning."""
    rank: int
    alpha: float
    dropout: float
    target_modules: Any                   # "all-linear" | [module names]


@_settings
class TrainSettings:
    """A trained model's engine: the actor, a critic, the ``optim`` section of SFT and reward-model
    training. Keys that are no field go to the engine as they are (``+actor.attn_implementation=eager``),
    checked against the engine's own config before any worker starts."""
    backend: Literal["fsdp", "megatron"]
    megatron: Optional[MegatronLayout] = None   # None: tp = pp = 1
    lr: float
    weight_decay: float
    grad_clip: Optional[float]
    lr_schedule: Literal["constant", "linear", "cosine"]
    warmup_steps: int
    micro_batch_size: Optional[int]
    max_tokens_per_micro_batch: Optional[int]
    remove_padding: bool
    compile: bool
    gradient_checkpointing: bool
    dtype: str
    lora: Optional[LoraSettings] = None   # None: full fine-tuning (a section without one)
    engine_options: Dict[str, Any] = collect()

    @property
    def uses_lora(self) -> bool:
        return self.lora is not None and self.lora.rank > 0


@_settings
class ActorSettings(TrainSettings):
    """The ``actor`` section: the engine plus the PPO-style update and its loss."""
    ppo_mini_batch_size: int
    ppo_epochs: int
    shuffle: bool
    policy_loss: str                      # registry name or spec
    policy_loss_args: Dict[str, Any]      # more keyword arguments of that loss (its named parameters)
    clip_ratio_low: float
    clip_ratio_high: float
    clip_ratio_c: float
    loss_agg_mode: str
    entropy_coeff: float
    use_kl_loss: bool
    kl_loss_coef: float
    kl_loss_type: str
    rollout_is: bool
    rollout_is_cap: float
    old_log_prob: Literal["auto", "recompute", "update", "rollout"]   # π_old of the ratio: see OLD_LOG_PROB

    def loss_options(self) -> dict:
        """The keyword arguments of the policy loss: the clip settings, the aggregation, then
        ``policy_loss_args``."""
        return {"loss_agg_mode": self.loss_agg_mode, "clip_ratio_low": self.clip_ratio_low,
                "clip_ratio_high": self.clip_ratio_high, "clip_ratio_c": self.clip_ratio_c,
                **self.policy_loss_args}


@_settings
class CriticSettings(TrainSettings):
    """The ``critic`` section (Safe RLHF's ``cost_critic`` starts from it)."""
    model_path: Optional[str]             # None: model.path with a fresh value head
    ppo_mini_batch_size: int
    ppo_epochs: int
    shuffle: bool
    cliprange_value: float
    loss_agg_mode: str


@_settings
class RefSettings:
    """The ``ref`` section; the reference runs on the actor's engine settings with lr 0, and keys
    added here override them for the reference only (``+ref.dtype=bf16``). With LoRA on the actor
    and the actor's own base as the reference, ``adapters_off`` makes the actor itself the
    reference (its module with the adapters off: no second copy)."""
    model_path: Optional[str]             # None: model.path
    adapters_off: bool
    overrides: Dict[str, Any] = collect()


@_settings
class RewardSettings:
    """The ``reward`` section (Safe RLHF's ``cost`` starts from it). Keys that are no field go to
    the reward model's engine (``+reward.forward_micro_batch_size=64``)."""
    function: Optional[str]               # path/to/file.py:fn | module:fn | builtin:NAME
    fallback_score: float
    strict: bool
    num_workers: int
    model_path: Optional[str]
    engine_options: Dict[str, Any] = collect()


# ------------------------------------------------------------------ rollout
@_settings
class StaticRolloutSettings:
    cuda_graph: bool
    sync_every: int
    weights: Literal["auto", "shared", "copy"]


@_settings
class VLLMSettings:
    kv_cache_gib: float
    gpu_memory_utilization: float
    max_model_len: Optional[int]          # None: resolved to data.max_prompt_length + rollout.max_new_tokens
    sleep: bool
    enforce_eager: bool
    dtype: str
    cache_dir: Optional[str]              # None: resolved to <trainer.run_dir>/vllm_cache
    lora: Literal["merged", "adapter"]    # a LoRA actor: merged weights, or vLLM's own adapter loading


@_settings
class RolloutSettings:
    backend: Literal["hf", "static", "vllm"]
    n: int
    temperature: float
    top_p: float
    top_k: int
    do_sample: bool
    max_new_tokens: int
    ignore_eos: bool
    static: StaticRolloutSettings
    vllm: VLLMSettings

    def sampling(self) -> dict:
        """The per-call sampling options (``meta_info`` of a batch may override each)."""
        return {k: getattr(self, k) for k in ("n", "temperature", "top_p", "top_k", "do_sample", "max_new_tokens",
                                              "ignore_eos")}


# ------------------------------------------------------------------ controller-side sections
@_settings
class KLControl:
    type: Literal["fixed", "adaptive"]
    kl_coef: float
    target_kl: float
    horizon: int


@_settings
class AlgorithmSettings:
    """The ``algorithm`` section. Other scalar keys are options of the estimator (its named keyword
    parameters, e.g. ``+algorithm.epsilon=1e-4`` for grpo); other sections belong to the recipe
    (``lagrange``, ``dynamic_sampling``, ``overlong_buffer``)."""
    adv_estimator: str                    # registry name or spec
    norm_adv_by_std: bool
    gamma: float
    lam: float
    use_kl_in_reward: bool
    kl_penalty: str
    kl_ctrl: KLControl
    options: Dict[str, Any] = collect()

    def estimator_options(self) -> dict:
        """Keyword arguments of the estimator: gamma, lam, norm_adv_by_std and the scalar options."""
        scalars = {k: v for k, v in self.options.items() if not isinstance(v, dict)}
        return {"norm_adv_by_std": self.norm_adv_by_std, "gamma": self.gamma, "lam": self.lam, **scalars}

    def section(self, name: str, cls: type | None = None) -> Any:
        """A recipe's own sub-section ``algorithm.<name>``: a dict, or bound to the dataclass ``cls``."""
        if not isinstance(self.options.get(name), dict):
            raise ConfigError(f"config key 'algorithm.{name}': this recipe needs that section")
        return bind(cls, self.options[name], f"algorithm.{name}") if cls else dict(self.options[name])


@_settings
class DynamicSampling:
    """DAPO's ``algorithm.dynamic_sampling``: generate+score rounds per step, at most."""
    max_gen_rounds: int


@_settings
class OverlongBuffer:
    """DAPO's ``algorithm.overlong_buffer``: the soft penalty grows from 0 to −``penalty_factor``
    over the last ``len`` tokens before ``rollout.max_new_tokens`` (``penalty_factor`` 0: off)."""
    len: int
    penalty_factor: float


@_settings
class ModelSettings:
    path: str


@_settings
class DataSettings:
    train: str
    val: Optional[str]
    prompt_key: str
    max_prompt_length: int
    batch_size: int
    val_batch_size: int
    shuffle: bool


@_settings
class TrainerSettings:
    steps: int
    run_dir: str
    trackers: List[str]
    project: str
    experiment: Optional[str]
    val_every: int
    val_before_train: bool
    save_every: int
    keep_last: Optional[int]
    resume: Any                           # auto | never | path/to/checkpoints/step_k (null/false: never)
    export_hf: bool
    plot: bool
    callbacks: List[str]                  # specs of classes with on_step_begin / on_step_end (trainer/run.py)


@_settings
class RunSettings:
    """Where a run's workers go: shared by every kind of run."""
    executor: Literal["inprocess", "ray"]
    world_size: int
    num_cpus_per_worker: float
    seed: int
    model: ModelSettings


@_settings
class RLSettings(RunSettings):
    """An RL recipe's config (recipes/base.yaml). ``cost`` / ``cost_critic`` (Safe RLHF) start from
    ``reward`` / ``critic``: their unset keys follow those sections."""
    data: DataSettings
    rollout: RolloutSettings
    actor: ActorSettings
    ref: RefSettings
    critic: CriticSettings
    reward: RewardSettings
    algorithm: AlgorithmSettings
    trainer: TrainerSettings
    cost: Optional[RewardSettings] = None
    cost_critic: Optional[CriticSettings] = None
    sections: Dict[str, Any] = collect()  # a recipe's own top-level sections

    def optimizer_steps(self, role: ActorSettings | CriticSettings) -> int:
        """Optimizer steps of the run (what LR schedules span): ``trainer.steps`` × ``ppo_epochs``
        × mini-batches per step (``data.batch_size · rollout.n / ppo_mini_batch_size``, rounded up)."""
        rows = self.data.batch_size * self.rollout.n
        return self.trainer.steps * role.ppo_epochs * -(-rows // role.ppo_mini_batch_size)

    def role_model(self, path: Optional[str]) -> str:
        """A role's checkpoint: its own ``model_path``, else ``model.path``."""
        return path or self.model.path

    @property
    def reference_from_actor(self) -> bool:
        """The actor serves the reference: LoRA on the actor, the reference is the actor's base
        (``ref.model_path`` null or ``model.path``) and ``ref.adapters_off``."""
        return (self.actor.uses_lora and self.ref.adapters_off and not self.ref.overrides
                and self.ref.model_path in (None, self.model.path))

    def reference_engine(self) -> TrainSettings:
        """The reference's engine: the actor's engine settings (without LoRA) with the ``ref``
        overrides on top."""
        keys = [f.name for f in dataclasses.fields(TrainSettings) if f.name not in ("engine_options", "lora")]
        actor = dataclasses.asdict(self.actor)
        merged = {**{k: actor[k] for k in keys}, **actor["engine_options"], **self.ref.overrides}
        if merged["megatron"] is None:
            merged.pop("megatron")
        else:
            merged["megatron"] = {**merged["megatron"].pop("options"), **merged["megatron"]}
        return bind(TrainSettings, merged, "ref")

    @property
    def needs_reference(self) -> bool:
        """A KL term reads the reference's log-probs (in the loss or in the reward)."""
        return self.actor.use_kl_loss or self.algorithm.use_kl_in_reward


@_settings
class SFTData:
    train: str
    prompt_key: str
    response_key: str
    max_length: int
    batch_size: int


@_settings
class SFTTrainer:
    steps: int
    run_dir: str
    trackers: List[str]
    export_every: int


@_settings
class SFTSettings(RunSettings):
    """recipes/sft.yaml."""
    data: SFTData
    optim: TrainSettings
    trainer: SFTTrainer


@_settings
class PairData:
    train: str
    val: Optional[str]
    prompt_key: str
    chosen_key: str
    rejected_key: str
    max_length: int
    batch_size: int


@_settings
class RMObjective:
    loss: str
    margin: float


@_settings
class RMTrainer:
    steps: int
    run_dir: str
    trackers: List[str]
    val_every: int


@_settings
class RewardModelSettings(RunSettings):
    """recipes/reward_model.yaml."""
    data: PairData
    rm: RMObjective
    optim: TrainSettings
    trainer: RMTrainer


# ------------------------------------------------------------------ resolution
def _container(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def _absolute(path: Optional[str]) -> Optional[str]:
    return os.path.abspath(os.path.expanduser(path)) if path else path


def _absolute_spec(spec: Optional[str]) -> Optional[str]:
    """``file.py:fn`` with the file made absolute (so workers with another cwd find it)."""
    if not spec or ":" not in spec or spec.startswith("builtin:"):
        return spec
    location, name = spec.rsplit(":", 1)
    if location.endswith(".py") or os.sep in location or "/" in location:
        return f"{_absolute(location)}:{name}"
    return spec


def check_checkpoint(key: str, path: Optional[str]) -> None:
    if path and not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{key}: {path!r} is not a Hugging Face checkpoint directory (no config.json; "
                          "expected the output of save_pretrained)")


def registry_value(registry, value: str, key: str) -> str:
    """``value`` (a name or spec) checked against ``registry`` and made portable for workers."""
    from hybridflow.trainer.algos import RegistryKeyError

    try:
        registry.resolve(value)
    except RegistryKeyError as err:
        raise ConfigError(f"config key {key!r}: {err}") from None
    return registry.portable(value)


def check_options(fn, options: dict, key: str, standard: tuple = ()) -> None:
    """Each option must be a named keyword parameter of ``fn`` (``standard`` ones may also go to
    ``**kwargs``): a misspelt option fails here instead of being dropped silently."""
    params = inspect.signature(fn).parameters
    named = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for name in options:
        if name not in named and name not in standard:
            raise ConfigError(unknown_key_message(f"{key}.{name}", [f"{key}.{n}" for n in named], "config").replace(
                " Prefix the key with '+' to add a new one.",
                f" {getattr(fn, '__qualname__', fn)} takes no such keyword argument."))


def typed_rl_settings(cfg: Any) -> RLSettings:
    """The config as :class:`RLSettings`, types checked, nothing else (no file is opened): what a
    test of one worker needs. Runs use :func:`rl_settings`."""
    raw = _container(cfg)
    for derived, base in (("cost", "reward"), ("cost_critic", "critic")):  # Safe RLHF: unset keys follow
        if isinstance(raw.get(derived), dict) and isinstance(raw.get(base), dict):
            raw[derived] = _container(OmegaConf.merge(raw[base], raw[derived]))
    return bind(RLSettings, raw)


OLD_LOG_PROB = """Where the update's π_old comes from (``actor.old_log_prob``):
- ``recompute``: a forward pass of the actor before the update (the ``old_log_prob`` stage);
- ``update``: the update's own forward, detached. Exact when each row feeds exactly one optimizer
  step (``ppo_epochs`` 1, one mini-batch per step: the ratio is then 1 by construction), and when
  nothing reads π_old before the update (no KL in the reward, no ``rollout_is``);
- ``rollout``: the rollout's log-probs (bypass; a speed win when rollout and trainer agree, which
  the ``rollout_corr/*`` metrics show);
- ``auto``: ``update`` where it is exact, else ``recompute``."""


def _old_log_prob(s: RLSettings) -> str:
    """``actor.old_log_prob`` resolved (see OLD_LOG_PROB): ``auto`` decided, the others checked."""
    a = s.actor
    one_step = a.ppo_epochs == 1 and s.data.batch_size * s.rollout.n <= a.ppo_mini_batch_size
    reads_old = ("algorithm.use_kl_in_reward" if s.algorithm.use_kl_in_reward else
                 "actor.rollout_is" if a.rollout_is else None)
    if a.old_log_prob == "auto":
        return "update" if one_step and reads_old is None else "recompute"
    if a.old_log_prob == "update" and not one_step:
        raise ConfigError("actor.old_log_prob=update: each row must feed exactly one optimizer step (actor.ppo_epochs 1 "
                          "and data.batch_size × rollout.n ≤ actor.ppo_mini_batch_size); use recompute or auto")
    if a.old_log_prob in ("update", "rollout") and reads_old == "actor.rollout_is":
        raise ConfigError(f"actor.old_log_prob={a.old_log_prob}: actor.rollout_is needs the recomputed π_old; "
                          "use recompute or auto")
    if a.old_log_prob == "update" and reads_old:
        raise ConfigError(f"actor.old_log_prob=update: {reads_old} reads π_old before the update; use recompute or auto")
    return a.old_log_prob


def check_lora(name: str, role: TrainSettings) -> None:
    """``<name>.lora``: a rank ≥ 0, the fsdp backend and the ``peft`` library when it is > 0."""
    if role.lora is None:
        return
    if role.lora.rank < 0 or role.lora.alpha <= 0 or not 0 <= role.lora.dropout < 1:
        raise ConfigError(f"{name}.lora: rank must be >= 0 (0: full fine-tuning), alpha > 0 and 0 <= dropout < 1; "
                          f"got rank={role.lora.rank}, alpha={role.lora.alpha}, dropout={role.lora.dropout}")
    if not role.uses_lora:
        return
    if role.backend == "megatron":
        raise ConfigError(f"{name}.lora.rank={role.lora.rank}: the megatron engine has no LoRA; use "
                          f"{name}.backend=fsdp for LoRA (docs/backends.md#lora)")
    if importlib.util.find_spec("peft") is None:
        raise ConfigError(f"{name}.lora.rank={role.lora.rank} needs the peft library: pip install -e '.[lora]' "
                          "(docs/backends.md#lora)")


def rl_settings(cfg: Any, *, check_data: bool = True) -> RLSettings:
    """The typed, checked settings of an RL run (see the module docstring); ``check_data=False``
    for a caller that brings its own prompts (the benchmarks): ``data.train``/``val`` may be absent."""
    from hybridflow.trainer.algos import ADVANTAGES, AGG_MODES, KL_PENALTIES, POLICY_LOSSES
    from hybridflow.trainer.checkpoint import resolve_resume
    from hybridflow.trainer.rewards import load_reward_function

    s = typed_rl_settings(cfg)

    if not os.path.isdir(s.model.path):
        raise ConfigError(f"model.path: {s.model.path!r} is not a directory (a local HF checkpoint)")
    check_checkpoint("model.path", s.model.path)
    for key, path in (("data.train", s.data.train), ("data.val", s.data.val)) if check_data else ():
        if path and not os.path.exists(path):
            raise ConfigError(f"{key}: file not found: {path}")
    rewards = {"reward": s.reward, **({"cost": s.cost} if s.cost else {})}
    for name, section in rewards.items():
        check_checkpoint(f"{name}.model_path", section.model_path)
        if name == "reward" and not (section.function or section.model_path):
            raise ConfigError("reward: set reward.function (path/to/file.py:fn or builtin:name) and/or "
                              "reward.model_path (a reward model); both are empty, so there is no reward")
        if section.function:
            load_reward_function(_absolute_spec(section.function))  # a syntax error or a typo shows now
    for key, path in (("ref.model_path", s.ref.model_path), ("critic.model_path", s.critic.model_path),
                      ("cost_critic.model_path", s.cost_critic.model_path if s.cost_critic else None)):
        check_checkpoint(key, path)
    if s.trainer.resume not in (None, False, "auto", "never"):  # an explicit checkpoint path must exist now
        try:
            resolve_resume(s.trainer.resume, s.trainer.run_dir)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"trainer.resume: {str(err).removeprefix('resume: ')}") from None

    for name, role in (("actor", s.actor), ("critic", s.critic), ("cost_critic", s.cost_critic)):
        if role is not None:
            check_lora(name, role)
    if s.rollout.backend == "vllm" and s.rollout.vllm.lora == "adapter" and not s.actor.uses_lora:
        raise ConfigError("rollout.vllm.lora=adapter loads the actor's LoRA adapters into vLLM; set actor.lora.rank > 0 "
                          "or rollout.vllm.lora=merged (docs/backends.md#lora)")
    if s.actor.uses_lora and s.rollout.backend == "static" and s.rollout.static.weights == "copy":
        raise ConfigError("rollout.static.weights=copy cannot hold a LoRA-adapted actor; use shared or auto")
    if s.actor.backend == "megatron" and s.rollout.backend == "static":
        raise ConfigError("rollout.backend: actor.backend=megatron generates with rollout.backend=hf or vllm, "
                          "not static (docs/backends.md#megatron)")
    estimator = registry_value(ADVANTAGES, s.algorithm.adv_estimator, "algorithm.adv_estimator")
    check_options(ADVANTAGES.resolve(estimator),
                  {k: v for k, v in s.algorithm.options.items() if not isinstance(v, dict)}, "algorithm")
    policy_loss = registry_value(POLICY_LOSSES, s.actor.policy_loss, "actor.policy_loss")
    check_options(POLICY_LOSSES.resolve(policy_loss), s.actor.policy_loss_args, "actor.policy_loss_args")
    actor = dataclasses.replace(
        s.actor, policy_loss=policy_loss, old_log_prob=_old_log_prob(s),
        loss_agg_mode=registry_value(AGG_MODES, s.actor.loss_agg_mode, "actor.loss_agg_mode"),
        kl_loss_type=registry_value(KL_PENALTIES, s.actor.kl_loss_type, "actor.kl_loss_type"))
    critics = {name: dataclasses.replace(c, loss_agg_mode=registry_value(AGG_MODES, c.loss_agg_mode,
                                                                         f"{name}.loss_agg_mode"))
               for name, c in (("critic", s.critic), ("cost_critic", s.cost_critic)) if c is not None}
    registry_value(KL_PENALTIES, s.algorithm.kl_penalty, "algorithm.kl_penalty")

    for i, spec in enumerate(s.trainer.callbacks):  # each names a class (built by RLRun); loadable now
        load_object(_absolute_spec(spec), what=f"trainer.callbacks[{i}]", error=ConfigError)
    vllm = s.rollout.vllm
    vllm = dataclasses.replace(
        vllm, max_model_len=vllm.max_model_len or s.data.max_prompt_length + s.rollout.max_new_tokens,
        cache_dir=_absolute(vllm.cache_dir or os.path.join(s.trainer.run_dir, "vllm_cache")))
    resolved = {name: dataclasses.replace(section, function=_absolute_spec(section.function))
                for name, section in rewards.items()}
    return dataclasses.replace(
        s, actor=actor, critic=critics["critic"], cost_critic=critics.get("cost_critic"),
        trainer=dataclasses.replace(s.trainer, callbacks=[_absolute_spec(c) for c in s.trainer.callbacks]),
        algorithm=dataclasses.replace(s.algorithm, adv_estimator=estimator),
        rollout=dataclasses.replace(s.rollout, vllm=vllm), reward=resolved["reward"], cost=resolved.get("cost"))


def sft_settings(cfg: Any) -> SFTSettings:
    """The typed settings of an SFT run (recipes/sft.yaml)."""
    s = bind(SFTSettings, _container(cfg))
    check_lora("optim", s.optim)
    return s


def reward_model_settings(cfg: Any) -> RewardModelSettings:
    """The typed settings of a reward-model run (recipes/reward_model.yaml), its loss checked."""
    from hybridflow.trainer.algos import PREFERENCE_LOSSES

    s = bind(RewardModelSettings, _container(cfg))
    check_lora("optim", s.optim)
    return dataclasses.replace(s, rm=dataclasses.replace(s.rm, loss=registry_value(PREFERENCE_LOSSES, s.rm.loss,
                                                                                    "rm.loss")))
