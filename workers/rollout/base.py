"""The rollout (generation) interface shared by every backend (hf, static, vllm).

Input ``prompts``: a TensorDict ``[B]`` with left-padded ``input_ids``, ``attention_mask`` and
``position_ids`` ``[B, P]`` (docs/design/contracts.md).

Output: a CPU TensorDict with ``B * n`` rows, the ``n`` samples of each prompt next to each other
(``[p0, p0, p1, p1]`` for ``n = 2``), and the columns

* ``prompts`` ``[B*n, P]``; ``responses`` ``[B*n, R]`` right-padded with ``pad_token_id`` to
  ``R = max_new_tokens``; tokens after the first EOS are padding;
* ``response_mask`` ``[B*n, R]`` (long) — 1 up to and including the first EOS; with
  ``ignore_eos=True`` EOS does not end a response: all ``R = max_new_tokens`` tokens are generated
  and the mask is all ones (for throughput benchmarks; the sampling distribution is unchanged);
* ``input_ids = cat(prompts, responses)``, ``attention_mask = cat(prompt mask, response_mask)``,
  ``position_ids = clamp(cumsum(attention_mask) - 1, 0)`` ``[B*n, P+R]``;
* ``rollout_log_probs`` ``[B*n, R]`` float32 — ``log_softmax(raw logits / T)`` of the sampled token
  (no top-k/top-p renormalisation; ``T = 1`` for greedy), 0 outside ``response_mask``.

Sampling: ``do_sample=False`` or ``temperature == 0`` is greedy; ``top_k`` of 0 or -1 and
``top_p == 1`` are off. ``seed`` (optional) makes sampling reproducible without touching the
caller's global RNG state.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import List, Optional, Sequence, Tuple, Union

import torch
from tensordict import TensorDict

__all__ = ["Rollout", "check_generate_args", "resolve_token_ids", "response_mask_from_eos", "finish_rollout_batch"]


class Rollout(ABC):
    """A generation backend. See the module docstring for the input/output contract."""

    # True: generates on the training engine's own module (hf, static), so an engine that keeps its
    # weights elsewhere (megatron) fills that module around each generation. False: the backend
    # holds its own weights (vLLM), refreshed by sync_weights.
    uses_engine_module = True

    @abstractmethod
    def generate(self, prompts: TensorDict, *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = -1, max_new_tokens: int, do_sample: bool = True,
                 eos_token_id: Optional[Union[int, Sequence[int]]] = None, pad_token_id: Optional[int] = None,
                 seed: Optional[int] = None, ignore_eos: bool = False) -> TensorDict:
        """Sample ``n`` responses per prompt; returns the columns listed in the module docstring."""

    # Hooks for backends that hold their own copy of the weights (vLLM). The defaults do nothing,
    # which is right for a backend that generates on the actor's own module (hf). Each returns
    # a dict of metrics (possibly empty).
    def sync_weights(self, engine) -> dict:
        """Copy ``engine``'s current weights into the rollout engine (after each actor update)."""
        return {}

    def sleep(self) -> dict:
        """Release generation memory (KV cache, weight copy) while the actor trains."""
        return {}

    def wake_up(self) -> dict:
        """Restore what :meth:`sleep` released, before the next generation."""
        return {}


def check_generate_args(backend: str, prompts: TensorDict, *, n: int, max_new_tokens: int, temperature: float,
                        top_p: float) -> None:
    """The argument checks every backend's ``generate`` makes (errors name the backend)."""
    if max_new_tokens < 1 or n < 1:
        raise ValueError(f"{backend}.generate: need max_new_tokens >= 1 and n >= 1, got {max_new_tokens}, {n}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"{backend}.generate: bad temperature={temperature} or top_p={top_p}")
    for key in ("input_ids", "attention_mask"):
        if key not in prompts.keys():
            raise KeyError(f"{backend}.generate: prompts lack {key!r}; they have {list(prompts.keys())}")


def as_id_list(value) -> List[int]:
    """``None`` / an int / a list / a tensor of token ids -> a list of ints."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def resolve_token_ids(backend: str, eos_token_id, pad_token_id, tokenizer=None, module=None) -> Tuple[List[int], int]:
    """``(eos ids, pad id)``: the given ones, else the tokenizer's, else the model's
    ``generation_config`` eos; pad defaults to the first eos."""
    eos = as_id_list(eos_token_id) or as_id_list(getattr(tokenizer, "eos_token_id", None))
    if not eos:
        eos = as_id_list(getattr(getattr(module, "generation_config", None), "eos_token_id", None))
    if not eos:
        raise ValueError(f"{backend}: no eos_token_id given and none found on the tokenizer or the model")
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
    return eos, int(pad_token_id if pad_token_id is not None else eos[0])


def response_mask_from_eos(responses: torch.Tensor, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """``[B, R]`` long mask: 1 on every token up to and including the first EOS of the row."""
    is_eos = torch.isin(responses, torch.as_tensor(list(eos_token_ids), device=responses.device))
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()
    return (eos_before == 0).long()


def finish_rollout_batch(prompts: TensorDict, responses: torch.Tensor, rollout_log_probs: torch.Tensor,
                         *, n: int, eos_token_ids: Sequence[int], pad_token_id: int,
                         ignore_eos: bool = False) -> TensorDict:
    """Assemble the output columns from the (un-repeated) prompts and the ``[B*n, R]`` sampled
    tokens and their log-probs: masks after the first EOS (nothing when ``ignore_eos``), pads,
    builds the full sequence."""
    prompt_ids = prompts["input_ids"].repeat_interleave(n, dim=0).cpu()
    prompt_mask = prompts["attention_mask"].repeat_interleave(n, dim=0).cpu().long()
    responses = responses.cpu()
    mask = torch.ones_like(responses) if ignore_eos else response_mask_from_eos(responses, eos_token_ids)
    responses = torch.where(mask.bool(), responses, torch.full_like(responses, pad_token_id))
    attention_mask = torch.cat([prompt_mask, mask], dim=1)
    return TensorDict({
        "prompts": prompt_ids,
        "responses": responses,
        "response_mask": mask,
        "input_ids": torch.cat([prompt_ids, responses], dim=1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
        "rollout_log_probs": rollout_log_probs.cpu().float() * mask,
    }, batch_size=[responses.shape[0]])
