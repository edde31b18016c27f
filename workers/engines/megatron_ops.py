"""Tensor pieces of the megatron engine that do not depend on the engine's state.

* :func:`vocab_parallel_log_probs` — log-prob of given tokens and the entropy from logits whose
  vocabulary is split over the tensor-parallel group (``[N, V/tp]`` per rank); no rank ever holds
  full-vocabulary logits.
* :func:`padded_causal_mask` — megatron's boolean attention mask (True = masked) for a
  left/right-padded batch.
* :class:`ValueHead` — the scalar head that replaces ``output_layer`` for value models.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["vocab_parallel_log_probs", "padded_causal_mask", "ValueHead"]


class _VocabParallelLogProbs(torch.autograd.Function):
    """``(z_local [N, V/tp], labels [N]) -> (log_probs [N], entropy [N])`` with ``z = logits / T``
    split over the vocabulary; rank r holds vocabulary ids ``[r V/tp, (r+1) V/tp)``.

    Forward (three all-reduces over ``group``): ``m = max_v z``; ``S = Σ_v exp(z − m)``;
    ``lse = m + log S``; ``log p(y) = z_y − lse`` (``z_y`` summed from the rank that owns ``y``);
    ``H = lse − Σ_v p_v z_v``. Backward is local: ``dz = g_lp (onehot(y) − p) − g_H p (log p + H)``.
    Upstream grads are identical on every TP rank (the loss is computed redundantly), so each
    rank's ``dz`` is the gradient of its own vocabulary shard.
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature, with_entropy, vocab_start, group):
        z = logits.float() / temperature
        m = z.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = torch.exp(z - m[:, None])
        local = labels - vocab_start
        owned = (local >= 0) & (local < z.shape[-1])
        z_y = torch.where(owned, z.gather(-1, local.clamp(0, z.shape[-1] - 1)[:, None]).squeeze(-1),
                          torch.zeros_like(m))
        stats = [e.sum(-1), z_y] + ([(e * z).sum(-1)] if with_entropy else [])
        stacked = torch.stack(stats)
        dist.all_reduce(stacked, group=group)
        s, z_y = stacked[0], stacked[1]
        lse = m + torch.log(s)
        log_probs = z_y - lse
        entropy = lse - stacked[2] / s if with_entropy else torch.zeros(0, device=z.device)
        ctx.save_for_backward(logits, local, owned, lse, entropy)
        ctx.temperature, ctx.with_entropy = temperature, with_entropy
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_lp, grad_h):
        logits, local, owned, lse, entropy = ctx.saved_tensors
        z = logits.float() / ctx.temperature
        log_p = z - lse[:, None]
        p = log_p.exp()
        dz = torch.zeros_like(z)
        if grad_lp is not None:
            dz -= p * grad_lp[:, None]
            idx = local.clamp(0, z.shape[-1] - 1)[:, None]
            dz.scatter_add_(-1, idx, (grad_lp * owned.to(grad_lp.dtype))[:, None])
        if ctx.with_entropy and grad_h is not None:
            dz -= grad_h[:, None] * p * (log_p + entropy[:, None])
        return (dz / ctx.temperature).to(logits.dtype), None, None, None, None, None


def vocab_parallel_log_probs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                             with_entropy: bool = False, group=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``log_softmax(full_logits / T).gather(labels)`` (and the entropy), float32, from this
    rank's vocabulary shard ``logits [..., V/tp]`` of the tensor-parallel ``group`` (megatron's
    TP group when None). ``labels`` hold global token ids. Differentiable w.r.t. ``logits``."""
    if temperature <= 0:
        raise ValueError(f"vocab_parallel_log_probs: temperature must be > 0, got {temperature}")
    if group is None:
        from megatron.core import parallel_state as ps

        group = ps.get_tensor_model_parallel_group()
    shape = labels.shape
    part = logits.shape[-1]
    start = dist.get_rank(group) * part if dist.get_world_size(group) > 1 else 0
    lp, ent = _VocabParallelLogProbs.apply(logits.reshape(-1, part), labels.reshape(-1).long(),
                                           float(temperature), bool(with_entropy), start, group)
    return lp.view(shape), (ent.view(shape) if with_entropy else None)


def padded_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, 1, L, L]`` bool, True where query ``i`` must not see key ``j``: ``j > i`` or key
    ``j`` is padding (``attention_mask[:, j] == 0``). Fully masked (padding) query rows are
    harmless: megatron fills masked scores with -10000, not -inf."""
    length = attention_mask.shape[1]
    future = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).triu(1)
    pad = ~attention_mask.bool()
    return (future[None] | pad[:, None, :])[:, None]


class ValueHead(torch.nn.Module):
    """``hidden [S, B, H] -> values [S, B, 1]`` (a ``Linear(H, 1)`` with bias), replicated on
    every tensor-parallel rank; stands in for ``GPTModel.output_layer`` (same call signature).
    Its input (after the final norm) is identical on all TP ranks, so are its gradients."""

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1, bias=True, dtype=dtype)

    def forward(self, hidden_states, weight=None, runtime_gather_output=None, **_):
        return self.score(hidden_states), None
