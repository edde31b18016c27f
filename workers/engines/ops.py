"""Backend-neutral tensor pieces of the training engines.

* :func:`token_log_probs` — log-prob of given tokens (and entropy) from logits, memory-light:
  ``log p = z[label] - logsumexp(z)`` with ``z = logits / T``, computed in float32 one chunk
  of rows at a time, with a hand-written backward that recomputes the softmax chunk-wise, so
  neither the forward nor the autograd graph keeps a float32 ``[N, V]`` copy of the logits.
* :func:`partition_micro_batches` — split rows into micro-batches by row count or by a token
  budget (greedy first-fit-decreasing on real token counts), optionally forced to an exact count
  so every data-parallel rank runs the same number of forward/backward passes.
* :func:`lr_factor` — the learning-rate multiplier of the warm-up + constant/linear/cosine schedule.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["token_log_probs", "partition_micro_batches", "lr_factor", "LR_SCHEDULES"]

# float32 elements of one chunk's temporaries (64 MiB): bounds the extra memory of token_log_probs.
_CHUNK_ELEMENTS = 1 << 24


def _chunks(n_rows: int, vocab: int):
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


class _TokenLogProbs(torch.autograd.Function):
    """``(logits [N, V], labels [N]) -> (log_probs [N], entropy [N])`` in float32 (float64 for
    float64 logits).

    Forward per chunk: ``z = logits.float() / T``, ``lse = logsumexp(z)``,
    ``log_probs = z[label] - lse``, ``entropy = lse - sum(softmax(z) * z)``.
    Backward per chunk, with ``p = softmax(z)`` and upstream grads ``g_lp``, ``g_h``:
    ``dz = g_lp * (onehot(label) - p) - g_h * p * (log p + H)``; ``dlogits = dz / T``.
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature, with_entropy):
        n, _ = logits.shape
        cdtype = torch.promote_types(logits.dtype, torch.float32)
        log_probs = torch.empty(n, dtype=cdtype, device=logits.device)
        entropy = torch.zeros(n if with_entropy else 0, dtype=cdtype, device=logits.device)
        lses = torch.empty(n, dtype=cdtype, device=logits.device)
        for a, b in _chunks(n, logits.shape[1]):
            z = logits[a:b].to(cdtype) / temperature
            lse = torch.logsumexp(z, dim=-1)
            lses[a:b] = lse
            log_probs[a:b] = z.gather(-1, labels[a:b, None]).squeeze(-1) - lse
            if with_entropy:
                entropy[a:b] = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
        ctx.save_for_backward(logits, labels, lses, entropy)
        ctx.temperature = temperature
        ctx.with_entropy = with_entropy
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        logits, labels, lses, entropy = ctx.saved_tensors
        temperature = ctx.temperature
        grad = torch.empty_like(logits)
        for a, b in _chunks(logits.shape[0], logits.shape[1]):
            z = logits[a:b].to(lses.dtype) / temperature
            log_p = z - lses[a:b, None]
            p = log_p.exp()
            dz = torch.zeros_like(z) if grad_log_probs is None else -p * grad_log_probs[a:b, None]
            if grad_log_probs is not None:
                dz.scatter_add_(-1, labels[a:b, None], grad_log_probs[a:b, None].to(dz.dtype))
            if ctx.with_entropy and grad_entropy is not None:
                dz -= grad_entropy[a:b, None] * p * (log_p + entropy[a:b, None])
            grad[a:b] = (dz / temperature).to(grad.dtype)
        return grad, None, None, None


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                    with_entropy: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``log_softmax(logits / T).gather(labels)`` (and the entropy of that distribution), float32
    (float64 for float64 logits).

    ``logits``: ``[..., V]`` of any float dtype; ``labels``: ``[...]`` long. Returns
    ``(log_probs [...], entropy [...] or None)``. Differentiable w.r.t. ``logits``.
    """
    if temperature <= 0:
        raise ValueError(f"token_log_probs: temperature must be > 0, got {temperature}")
    shape = labels.shape
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1).long()
    log_probs, entropy = _TokenLogProbs.apply(flat_logits, flat_labels, float(temperature), bool(with_entropy))
    return log_probs.view(shape), (entropy.view(shape) if with_entropy else None)


def partition_micro_batches(lengths: Sequence[int], *, micro_batch_size: Optional[int] = None,
                            max_tokens: Optional[int] = None,
                            num_micro_batches: Optional[int] = None) -> List[Optional[List[int]]]:
    """Row indices of each micro-batch.

    * ``max_tokens`` set: rows sorted by length (longest first) go into the first micro-batch
      whose real-token total stays ``<= max_tokens`` (and whose row count stays ``<=
      micro_batch_size`` if that is set); a row longer than the budget gets its own micro-batch.
    * otherwise: consecutive chunks of ``micro_batch_size`` rows (all rows if None).

    ``num_micro_batches`` (>= the natural count) forces the exact count, as data-parallel ranks
    need: the micro-batch with the most tokens among those with >= 2 rows is split in two until
    the count is reached; if rows run out, ``None`` entries (run as zero-weight dummies by the
    engine) fill up. Within a micro-batch indices are ascending.
    """
    lengths = [int(x) for x in lengths]
    n = len(lengths)
    if n == 0:
        raise ValueError("partition_micro_batches: empty batch")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    groups: List[List[int]]
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens_per_micro_batch must be >= 1, got {max_tokens}")
        groups, totals = [], []
        for i in sorted(range(n), key=lambda j: (-lengths[j], j)):
            for g, group in enumerate(groups):
                if totals[g] + lengths[i] <= max_tokens and (micro_batch_size is None or len(group) < micro_batch_size):
                    group.append(i)
                    totals[g] += lengths[i]
                    break
            else:
                groups.append([i])
                totals.append(lengths[i])
    else:
        size = micro_batch_size or n
        groups = [list(range(s, min(s + size, n))) for s in range(0, n, size)]
    groups = [sorted(g) for g in groups]
    if num_micro_batches is not None:
        if num_micro_batches < len(groups):
            raise ValueError(f"partition_micro_batches: {len(groups)} micro-batches needed, "
                             f"{num_micro_batches} requested")
        while len(groups) < num_micro_batches:
            splittable = [g for g in groups if len(g) >= 2]
            if not splittable:
                break
            big = max(splittable, key=lambda g: (sum(lengths[i] for i in g), len(g)))
            groups.remove(big)
            half = _token_half(big, lengths)
            groups += [big[:half], big[half:]]
        groups.sort(key=lambda g: g[0])
    out: List[Optional[List[int]]] = list(groups)
    if num_micro_batches is not None:
        out += [None] * (num_micro_batches - len(out))
    return out


def _token_half(group: List[int], lengths: List[int]) -> int:
    """Split point (1..len-1) that divides the group's tokens most evenly."""
    total = sum(lengths[i] for i in group)
    running, best, best_gap = 0, 1, math.inf
    for k in range(1, len(group)):
        running += lengths[group[k - 1]]
        gap = abs(total - 2 * running)
        if gap < best_gap:
            best, best_gap = k, gap
    return best


LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, *, warmup_steps: int = 0, total_steps: Optional[int] = None,
              schedule: str = "constant", min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (so the first step already
    moves). After it, with ``progress = clamp((step - warmup_steps) / max(1, total_steps -
    warmup_steps), 0, 1)``: constant ``1``; linear ``m + (1 - m)(1 - progress)``; cosine
    ``m + (1 - m) * 0.5 * (1 + cos(pi * progress))``, where ``m = min_lr_ratio``.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if total_steps is None:
        raise ValueError(f"lr_schedule={schedule!r} needs total_steps")
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if schedule == "linear":
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
