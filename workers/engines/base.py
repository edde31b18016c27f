"""The training-engine interface shared by every backend (FSDP2 now, Megatron later).

A :class:`TrainEngine` owns one model, its optimizer and LR scheduler on the ranks of a
data-parallel group, and exposes four things the role code (actor, critic, reference, reward
model, SFT) needs:

* ``forward(batch)`` — no-grad log-probs (causal LM) or values (value model), micro-batched;
* ``train_batch(batch, loss_fn)`` — exactly one optimizer step over ``batch`` (gradient
  accumulation over micro-batches, grad clipping, scheduler step);
* ``save_checkpoint`` / ``load_checkpoint`` (resumable training state) and ``export_hf``
  (a plain transformers checkpoint);
* ``module``, ``tokenizer``, ``device``.

Batch columns follow docs/design/contracts.md. Two modes, chosen by the columns present:

* **response mode** (``responses`` present, RL): ``input_ids = cat(prompts, responses)`` of
  length ``P + R``. Causal LM: ``log_probs[:, t] = log_softmax(logits[:, P-1+t] / T)[responses[:, t]]``
  (``[B, R]``, and ``entropy`` of the same distribution). Value model: ``values[:, t] =
  head(hidden[:, P-1+t])``, the value of the state *before* response token ``t`` is generated
  (prompt + ``responses[:, :t]``); ``values[:, 0]`` is the value of the bare prompt.
* **all-token mode** (no ``responses``, e.g. SFT, reward models): causal LM returns
  ``log_probs`` ``[B, L-1]`` of ``input_ids[:, 1:]`` (``log_probs[:, t]`` predicts token ``t+1``);
  a ``loss_mask`` column, if present, must be ``[B, L-1]`` aligned with those targets.
  Value model returns ``values`` ``[B, L]`` (head at every position; a reward model reads it at
  the last real token).

Outputs are float32 and 0 where there is no real token (``attention_mask == 0``).
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from tensordict import TensorDict

__all__ = ["EngineConfig", "TrainEngine", "LossFn", "MODEL_TYPES", "LOSS_WEIGHTINGS", "micro_batch_sizes"]

MODEL_TYPES = ("causal_lm", "value")
LOSS_WEIGHTINGS = ("auto", "tokens", "rows", "sum")
_DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

#: ``loss_fn(micro_batch, outputs) -> (loss, metrics)``; see :meth:`TrainEngine.train_batch`.
LossFn = Callable[[TensorDict, TensorDict], Tuple[torch.Tensor, Dict[str, Any]]]



def micro_batch_sizes(batch: TensorDict, groups: list, loss_weighting: str, engine: str) -> Tuple[str, List[float]]:
    """Resolve ``loss_weighting`` (``auto`` → ``tokens`` when the mask column exists, else ``rows``;
    see :meth:`TrainEngine.train_batch`) and return it with each micro-batch's size in that unit
    (mask tokens or rows; 0 for a ``None`` dummy group)."""
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
    mask_key = "response_mask" if "responses" in batch.keys() else "loss_mask"
    if loss_weighting == "auto":
        loss_weighting = "tokens" if mask_key in batch.keys() else "rows"
    if loss_weighting == "tokens" and mask_key not in batch.keys():
        raise KeyError(f"{engine}.train_batch: loss_weighting='tokens' needs a {mask_key!r} column")
    if loss_weighting == "tokens":
        sizes = [float(batch[mask_key][torch.tensor(g)].sum()) if g is not None else 0.0 for g in groups]
    else:
        sizes = [float(len(g)) if g is not None else 0.0 for g in groups]
    return loss_weighting, sizes

@dataclasses.dataclass
class EngineConfig:
    """Backend-neutral engine settings. Build with :meth:`from_any` (dict, omegaconf node, or
    an instance); unknown keys raise ``ValueError`` naming them.

    model_path: local HF checkpoint dir (config.json + weights; tokenizer loaded if present). Required.
    model_type: ``causal_lm`` | ``value``. ``value`` loads the dir with
        ``AutoModelForTokenClassification(num_labels=1, classifier_dropout=0)``: the causal-LM body
        is reused, the ``score`` head (hidden -> 1, with bias) is new and randomly initialised from
        ``seed`` (identical on every rank); ``lm_head`` is dropped. Use it for critics and reward models.
    dtype: compute dtype, ``auto`` = bf16 on GPU, fp32 on CPU; also ``float32``/``bfloat16``/``float16``.
        Master weights, gradients reduction and optimizer state stay fp32.
    attn_implementation: passed to ``from_pretrained`` (None = transformers' default, sdpa).
    trust_remote_code: passed to ``from_pretrained`` (default False).
    gradient_checkpointing: recompute activations in backward (default False).
    lr (1e-6), weight_decay (0.01, not applied to 1-D params: biases, norms), betas ((0.9, 0.999)),
    eps (1e-8): AdamW.
    warmup_steps (0): linear warm-up steps; if 0, ``warmup_ratio * total_steps`` (warmup_ratio 0.0).
    total_steps (None): optimizer steps of the run; required by linear/cosine and warmup_ratio.
    lr_schedule (``constant``): ``constant`` | ``linear`` | ``cosine`` after warm-up (see ops.lr_factor).
    min_lr_ratio (0.0): floor of linear/cosine decay, as a fraction of lr.
    grad_clip (1.0): max global grad norm; None or <= 0 disables clipping (the norm is still reported).
    micro_batch_size (None): rows per micro-batch; None = the whole (local) batch at once.
    max_tokens_per_micro_batch (None): token budget per micro-batch; when set, rows are packed
        greedily by real token count (``attention_mask.sum``), longest first; ``micro_batch_size``
        then only caps the rows.
    forward_micro_batch_size / forward_max_tokens_per_micro_batch (None): the same for
        ``forward`` (no grad, so usually larger); None = the training values.
    remove_padding (False): pack each micro-batch's real tokens into one sequence (position ids
        restart per sequence, block-diagonal attention) so the linear layers spend nothing on
        padding; outputs are the same as the padded path's up to float rounding. With ``sdpa`` the
        mask is dense over the pack (attention ~ pack length²): worth it with a variable-length
        kernel (``attn_implementation="flash_attention_2"``, or ``"flex_attention"`` on a GPU:
        its document mask skips the blocks between sequences) or short sequences.
    compile (False): ``torch.compile`` each decoder layer's forward (FSDP2's gather/free hooks
        stay outside the compiled code; parameter names are unchanged). Fuses the element-wise
        work around the matmuls; the first micro-batch of each new shape pays the compile time.
        Same outputs up to float rounding. No gain on the CPU model of the benchmarks.
    seed (0): seeds the value-head initialisation.
    lora_rank (0): > 0 trains LoRA adapters of this rank (Hu et al. 2021, "LoRA: Low-Rank
        Adaptation of Large Language Models"; the ``peft`` library) on ``lora_target_modules``
        (``all-linear``, or a list of module names) and keeps every other weight frozen:
        ``W x + (alpha / r) · B A x``, ``B`` starting at 0, so the first forward is the base
        model's. A value model also trains its new ``score`` head. lora_alpha (16.0),
        lora_dropout (0.0).
    """

    model_path: Optional[str] = None
    model_type: str = "causal_lm"
    dtype: str = "auto"
    attn_implementation: Optional[str] = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    total_steps: Optional[int] = None
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: Optional[float] = 1.0
    micro_batch_size: Optional[int] = None
    max_tokens_per_micro_batch: Optional[int] = None
    forward_micro_batch_size: Optional[int] = None
    forward_max_tokens_per_micro_batch: Optional[int] = None
    remove_padding: bool = False
    compile: bool = False
    seed: int = 0
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: Any = "all-linear"

    @classmethod
    def from_any(cls, config: Any = None, **overrides: Any) -> "EngineConfig":
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            values = dataclasses.asdict(config)
        elif config is None:
            values = {}
        else:
            try:
                from omegaconf import DictConfig, OmegaConf
                if isinstance(config, DictConfig):
                    config = OmegaConf.to_container(config, resolve=True)
            except ImportError:  # pragma: no cover - omegaconf is a dependency
                pass
            values = dict(config)
        values.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        out = cls(**values)
        out.validate()
        return out

    def validate(self) -> None:
        from .ops import LR_SCHEDULES

        if not self.model_path:
            raise ValueError(f"{type(self).__name__}: model_path is required (a local HF checkpoint dir)")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        needs_total = self.lr_schedule != "constant" or (self.warmup_ratio > 0 and not self.warmup_steps)
        if needs_total and not self.total_steps:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} / warmup_ratio={self.warmup_ratio} needs total_steps")
        if int(self.lora_rank) < 0:
            raise ValueError(f"lora_rank must be >= 0 (0: no LoRA), got {self.lora_rank}")
        for key in ("micro_batch_size", "max_tokens_per_micro_batch", "forward_micro_batch_size",
                    "forward_max_tokens_per_micro_batch"):
            value = getattr(self, key)
            if value is not None and int(value) < 1:
                raise ValueError(f"{key} must be >= 1 or None, got {value}")
        self.betas = tuple(float(b) for b in self.betas)

    def resolved_warmup_steps(self) -> int:
        if self.warmup_steps:
            return int(self.warmup_steps)
        return int(self.warmup_ratio * self.total_steps) if self.warmup_ratio and self.total_steps else 0

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        dtype = _DTYPES[self.dtype]
        if dtype is None:
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return dtype


class TrainEngine(ABC):
    """One model + optimizer + LR scheduler, trained data-parallel over this group's ranks.

    Each rank calls every method with its *local* shard of the batch (SPMD); the engine
    averages gradients over ranks. See the module docstring for batch modes and outputs.
    """

    config: EngineConfig
    global_step: int = 0

    # ------------------------------------------------------------------ compute
    @abstractmethod
    def forward(self, batch: TensorDict, *, temperature: float = 1.0, with_entropy: bool = False) -> TensorDict:
        """No-grad, micro-batched. Causal LM: ``log_probs`` (+ ``entropy``); value: ``values``.
        Returns a CPU float32 TensorDict with the batch's row count."""

    @abstractmethod
    def train_batch(self, batch: TensorDict, loss_fn: LossFn, *, temperature: float = 1.0,
                    with_entropy: bool = False, loss_weighting: str = "auto") -> Dict[str, float]:
        """Exactly one optimizer step over ``batch`` (this rank's shard).

        For each micro-batch ``mb`` (rows of ``batch``, tensors on ``device``): ``outputs`` = what
        :meth:`forward` returns for ``mb`` but with grad; ``loss, metrics = loss_fn(mb, outputs)``;
        backward of ``loss * w``. ``loss_weighting`` picks ``w`` so that the accumulated gradient
        is that of the loss over the *global* batch (all ranks), given that ``loss_fn`` returns a
        mean over its micro-batch:

        * ``tokens`` (``auto`` when the mask column ``response_mask``/``loss_mask`` exists):
          ``w = mask tokens in mb / mask tokens in the global batch`` — exact for token-mean losses;
        * ``rows`` (``auto`` otherwise): ``w = rows in mb / rows in the global batch`` — exact for
          per-sequence means (``seq-mean-*``);
        * ``sum``: ``w = 1``: ``loss_fn`` already divides by a global normaliser
          (e.g. ``agg_loss(..., norm_constant=global_count)``) and the step uses the sum.

        These are the effective weights of the global gradient; a backend whose gradient
        reduction averages over the ``D`` data-parallel ranks multiplies them by ``D``.

        Then clip the global grad norm, optimizer step (skipped if the norm is not finite),
        scheduler step. Returns the ``metrics`` averaged over this rank's micro-batches (weighted
        by their local token/row share) plus ``grad_norm`` (before clipping) and ``lr`` (used by
        this step).
        """

    # ------------------------------------------------------------------ state
    @abstractmethod
    def save_checkpoint(self, path: str) -> None:
        """Save model + optimizer + scheduler + ``global_step`` (sharded, every rank calls)."""

    @abstractmethod
    def load_checkpoint(self, path: str) -> None:
        """Restore what :meth:`save_checkpoint` wrote (every rank calls)."""

    @abstractmethod
    def export_hf(self, path: str, dtype: Optional[torch.dtype] = None) -> None:
        """Write a plain transformers checkpoint (safetensors + config + tokenizer) to ``path``."""

    # ------------------------------------------------------------------ handles
    @property
    @abstractmethod
    def module(self) -> torch.nn.Module:
        """The (wrapped) HF module, e.g. for the HF rollout."""

    # Backends set ``_tokenizer``, ``_device``, ``_rank`` and ``_world`` in their constructor.
    @property
    def tokenizer(self):
        """The tokenizer loaded from ``model_path`` (None if the dir has none)."""
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        """Device of the compute (``cuda:<local rank>`` or ``cpu``)."""
        return self._device

    @property
    def rank(self) -> int:
        """This process's rank in the engine's process group."""
        return self._rank

    @property
    def world_size(self) -> int:
        """Ranks of the engine's process group."""
        return self._world

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step will use."""
        raise NotImplementedError
