"""Rollout with transformers ``generate`` on the actor's own module (no weight copy).

The module may be FSDP2-sharded: ``generate`` then all-gathers each layer per decoding step
(slow, but no extra copy of the weights). When the module is sharded over more than one rank,
``synced_gpus=True`` keeps ranks that finished early stepping with the others, since every
forward is a collective.

Sampling log-probs are recorded by a logits processor placed *first* in the processor list, so
it sees the raw float32 logits before temperature/top-k/top-p: it keeps ``log_softmax(logits / T)``
of the latest step (``[B, V]``) and gathers the token once the next step reveals it. Memory is
``O(B * V)`` instead of the ``O(B * R * V)`` of ``output_logits=True``.

The module's own ``generation_config`` (e.g. a hub ``top_k=20`` or ``repetition_penalty``) is
swapped for a neutral one during the call, so only the arguments of :meth:`HFRollout.generate`
shape the sampling distribution (as the log-prob contract requires). ``position_ids`` of the input
are not passed: transformers derives them from ``attention_mask`` (same values on real tokens).

``ignore_eos=True`` (``rollout.ignore_eos``, for throughput benchmarks: every response is exactly
``max_new_tokens`` long, as in the HybridFlow paper) follows vLLM's ``SamplingParams.ignore_eos``:
EOS no longer *stops* a sequence, but it is not suppressed either — it may be sampled and decoding
goes on after it. The sampling distribution is therefore unchanged and the recorded log-probs are
still those of the raw logits, equal to the trainer's recompute; ``response_mask`` is all ones
(an EOS inside a response is an ordinary token). The alternative, banning EOS
(``min_new_tokens``), would sample from a renormalised distribution that the trainer's log-probs
do not describe.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Union

import torch
from tensordict import TensorDict
from transformers import LogitsProcessor

from .base import Rollout, check_generate_args, finish_rollout_batch, resolve_token_ids

__all__ = ["HFRollout"]


class _SampledTokenLogProbs(LogitsProcessor):
    """LogitsProcessor: ``log_softmax(raw_scores / T)`` of each sampled token, step by step."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self._pending: Optional[torch.Tensor] = None
        self._steps: List[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._pending is not None:  # input_ids[:, -1] is the token sampled from _pending
            self._steps.append(self._pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self._pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        if self._pending is not None:
            self._steps.append(self._pending.gather(-1, last_tokens[:, None]).squeeze(-1))
            self._pending = None
        if not self._steps:
            return torch.zeros(last_tokens.shape[0], 0)
        return torch.stack(self._steps, dim=1)



def _is_sharded(module: torch.nn.Module) -> bool:
    for param in module.parameters():
        mesh = getattr(param, "device_mesh", None)
        return mesh is not None and mesh.size() > 1
    return False


class HFRollout(Rollout):
    """``HFRollout(module, tokenizer, device)``: generate with ``module.generate`` (an HF causal
    LM, possibly FSDP2-wrapped); ``tokenizer`` supplies default eos/pad ids."""

    def __init__(self, module: torch.nn.Module, tokenizer=None, device: Union[str, torch.device] = "cpu"):
        self.module = module
        self.tokenizer = tokenizer
        self.device = torch.device(device)

    def generate(self, prompts: TensorDict, *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = -1, max_new_tokens: int, do_sample: bool = True,
                 eos_token_id: Optional[Union[int, Sequence[int]]] = None, pad_token_id: Optional[int] = None,
                 seed: Optional[int] = None, ignore_eos: bool = False) -> TensorDict:
        from transformers import GenerationConfig, LogitsProcessorList

        check_generate_args("HFRollout", prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p)
        greedy = not do_sample or temperature == 0
        eos, pad = resolve_token_ids("HFRollout", eos_token_id, pad_token_id, self.tokenizer, self.module)
        input_ids = prompts["input_ids"].repeat_interleave(n, dim=0).to(self.device)
        attention_mask = prompts["attention_mask"].repeat_interleave(n, dim=0).to(self.device)
        sampling = {} if greedy else {"temperature": float(temperature), "top_p": float(top_p),
                                      "top_k": 0 if top_k in (None, 0, -1) else int(top_k)}
        stop_ids = None if ignore_eos else eos  # ignore_eos: EOS does not stop generation (module docstring)
        gen_config = GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=not greedy, num_beams=1,
                                      use_cache=True, eos_token_id=stop_ids, pad_token_id=pad, **sampling)
        recorder = _SampledTokenLogProbs(1.0 if greedy else float(temperature))

        module = self.module
        saved_config, was_training = module.generation_config, module.training
        module.generation_config = GenerationConfig(eos_token_id=stop_ids, pad_token_id=pad)
        module.eval()
        rng = contextlib.nullcontext()
        if seed is not None:
            rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        try:
            with rng, torch.no_grad():
                if seed is not None:
                    torch.manual_seed(seed)
                sequences = module.generate(input_ids=input_ids, attention_mask=attention_mask,
                                            generation_config=gen_config,
                                            logits_processor=LogitsProcessorList([recorder]),
                                            synced_gpus=_is_sharded(module))
        finally:
            module.generation_config = saved_config
            module.train(was_training)

        new_tokens = sequences[:, input_ids.shape[1]:]
        log_probs = (recorder.finish(new_tokens[:, -1]) if new_tokens.shape[1]
                     else torch.zeros(new_tokens.shape[0], 0, device=new_tokens.device))
        if log_probs.shape[1] != new_tokens.shape[1]:
            raise RuntimeError(f"HFRollout: recorded {log_probs.shape[1]} log-prob steps for "
                               f"{new_tokens.shape[1]} generated tokens")
        missing = int(max_new_tokens) - new_tokens.shape[1]
        new_tokens = torch.nn.functional.pad(new_tokens, (0, missing), value=pad)
        log_probs = torch.nn.functional.pad(log_probs, (0, missing))
        return finish_rollout_batch(prompts, new_tokens, log_probs, n=n, eos_token_ids=eos, pad_token_id=pad,
                                    ignore_eos=ignore_eos)


def from_engine(engine, rollout=None, seed: int = 0) -> HFRollout:
    """``rollout.backend=hf``: generate on the engine's own (possibly FSDP2-sharded) module."""
    return HFRollout(engine.module, engine.tokenizer, engine.device)
