"""Fast rollout on plain torch: a static KV cache, sampling on device, CUDA-graph decode steps.

``rollout.backend=static``. The decode loop is written here over the HF causal-LM module's
``forward`` (no ``generate``):

1. **Prefill** the left-padded prompts ``[B*n, P]`` into a preallocated KV cache of static length
   ``L = P + R - 1`` (:class:`StaticKVCache`, one ``[B*n, H_kv, L, D]`` key and value buffer per
   layer, written in place with ``index_copy_``), with the prompts' own ``position_ids`` and a
   4-D mask ``key j visible from query i  ⇔  j ≤ i and prompt_mask[j]``.
2. **Decode** ``R - 1`` fixed-shape steps. A step reads only device tensors and updates them in
   place (last token, position, cache write index, output column, ``done`` flags), so the very
   same Python function runs eagerly (CPU, or ``rollout.static.cuda_graph=false``) or is captured
   once per call into a CUDA graph and replayed (CUDA): no host work per step but ``replay()``.
   The mask over the static length is ``prompt_mask[j] or P ≤ j ≤ write_index``.
   Attention runs through :func:`grouped_attention` (registered with transformers'
   ``AttentionInterface`` and selected only for the duration of the call): grouped-query
   attention with a mask, without copying each KV head for its query heads as ``repeat_kv`` does
   (transformers repeats K/V whenever a mask is given; for Qwen2-0.5B that is 7 × the KV bytes
   read per step).
3. **Sample on device**, batched: ``z = logits / T``; top-k keeps ``z ≥ k-th largest``; top-p keeps
   the smallest set of highest-probability tokens whose mass reaches ``top_p`` (the tokens whose
   ascending cumulative mass is ``≤ 1 − top_p`` are dropped, the most likely one always stays);
   a token is drawn by the exponential race ``argmax(p / E)``, ``E ~ Exp(1)`` from a seeded
   ``torch.Generator`` (the caller's global RNG is not touched when ``seed`` is given).
   Greedy is ``argmax(logits)``. The recorded ``rollout_log_probs`` is
   ``log_softmax(raw logits / T)[token]`` in float32 (``T = 1`` for greedy), before top-k/top-p,
   as workers/rollout/base.py requires: the trainer's recompute gives the same numbers.

Stopping: a row is done after its first EOS (then fed ``pad``); the loop ends when every row is
done — checked every step when eager, every ``rollout.static.sync_every`` steps under CUDA graphs
(one host sync each) — or after ``R`` tokens. ``ignore_eos=True`` always runs ``R`` tokens and
never replaces a token after EOS. When the module is FSDP2-sharded over several ranks and decoded
eagerly, every forward is a collective: the ranks all-reduce the "all done" flag (MIN) each step,
so they run the same number of steps.

Weights (``rollout.static.weights``): ``shared`` decodes on the engine's own module, as ``hf``
does — for an FSDP2 module every layer of every step runs FSDP's unshard hooks (an all-gather
over the ranks). ``copy`` keeps a plain module with the full weights in the engine's compute
dtype (bf16 on GPU; one extra copy of the weights per rank) and refreshes it in place at every
call (``copy_`` from ``full_tensor()``, a collective), so decoding runs no hook and no collective
and the copy's storage never moves — what a CUDA graph needs, since it cannot capture FSDP2's
all-gathers. ``auto`` (default) is ``copy`` for an FSDP2 module that is alone on its mesh or
decoded with CUDA graphs, ``shared`` otherwise (several ranks decoding eagerly keep only their
shard). The KV cache and the graph are built per call and freed at the end, so training gets
that memory back.

Supported: decoder-only HF models whose attention reads past keys/values through
``past_key_values.update(k, v, layer_idx)``, takes a 4-D mask as it is and picks its attention
function from ``config._attn_implementation`` (Qwen2, Llama, Mistral, ...), no sliding-window
layers.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from tensordict import TensorDict

from .base import Rollout, check_generate_args, finish_rollout_batch, resolve_token_ids
from .hf import _is_sharded

__all__ = ["StaticRollout", "StaticKVCache", "sample_tokens", "grouped_attention", "from_engine"]

ATTENTION = "hybridflow_static"  # the AttentionInterface name of grouped_attention


def grouped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of ``query [B, H, q, D]`` over ``key``/``value [B, H_kv, L, D]`` with a boolean
    ``attention_mask [B, 1, q, L]``; returns ``[B, q, H, D]`` (transformers' attention-function
    contract). Query head ``h`` reads KV head ``h // G`` (``G = H / H_kv``), as with ``repeat_kv``;
    the ``G`` query heads of a KV head are folded into the query-length axis instead, so K/V are
    read in place: ``softmax(q_g k^T · scaling + mask) v`` per group."""
    b, h, q, d = query.shape
    groups = h // key.shape[1]
    folded = query.reshape(b, key.shape[1], groups * q, d)
    mask = attention_mask
    if mask is not None and q > 1 and groups > 1:
        mask = mask.repeat(1, 1, groups, 1)  # row g*q + i of a group is query position i
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, h, q, value.shape[-1]).transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Make ``grouped_attention`` known to transformers as ``ATTENTION`` (done by the first
    :class:`StaticRollout`, not at import: importing this module changes nothing global)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, grouped_attention)


class StaticKVCache:
    """Preallocated key/value buffers ``[B, H_kv, L, D]`` per layer, written in place at
    ``self.index`` (a device ``long`` tensor of the positions the current forward writes).
    Duck-types the ``update`` of transformers' ``Cache``; the buffers are allocated at the first
    write (dtype, device, heads and head size from the key states)."""

    is_compileable = True

    def __init__(self, length: int):
        self.length = int(length)
        self.keys: dict = {}
        self.values: dict = {}
        self.index: Optional[torch.Tensor] = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx not in self.keys:
            b, h, _, d = key_states.shape
            self.keys[layer_idx] = key_states.new_zeros(b, h, self.length, d)
            self.values[layer_idx] = value_states.new_zeros(b, h, self.length, value_states.shape[-1])
        self.keys[layer_idx].index_copy_(2, self.index, key_states)
        self.values[layer_idx].index_copy_(2, self.index, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.length

    def __len__(self) -> int:
        return len(self.keys)


def sample_tokens(logits: torch.Tensor, *, greedy: bool, temperature: float, top_k: int, top_p: float,
                  generator: Optional[torch.Generator]):
    """``(tokens [B], log_probs [B])`` from ``logits [B, V]``, all on the logits' device, no host
    sync. ``log_probs = log_softmax(logits.float() / T)[token]`` (``T = 1`` when greedy); the draw
    is from that distribution restricted by top-k, then top-p (module docstring)."""
    logits = logits.float()
    if greedy:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    z = logits / temperature
    log_probs = torch.log_softmax(z, -1)
    filtered = z
    if top_k > 0 and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = filtered.sort(dim=-1)
        cumulative = ascending.softmax(-1).cumsum(-1)
        drop = cumulative <= 1.0 - top_p
        drop[:, -1] = False  # the most likely token always stays
        filtered = filtered.scatter(-1, order, ascending.masked_fill(drop, float("-inf")))
    # inverse-CDF draw: one uniform number per row (not one per vocabulary entry), the first token
    # whose cumulative probability exceeds it; tokens of probability 0 can never be drawn
    cdf = filtered.softmax(-1).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    return tokens, log_probs.gather(-1, tokens[:, None]).squeeze(-1)


class _Decode:
    """State of one generate call: cache, in-place step tensors, outputs, sampling constants."""

    def __init__(self, module, batch: int, prompt_len: int, new_tokens: int, prompt_mask, device, *,
                 sampling: dict, eos: Sequence[int], pad: int, ignore_eos: bool):
        self.module, self.P, self.R = module, prompt_len, new_tokens
        self.L = prompt_len + new_tokens - 1
        self.cache = StaticKVCache(self.L)
        self.sampling, self.pad, self.ignore_eos = sampling, int(pad), ignore_eos
        self.eos = torch.as_tensor(list(eos), dtype=torch.long, device=device)
        self.base_valid = torch.nn.functional.pad(prompt_mask.bool(), (0, self.L - prompt_len))  # [B, L]
        self.arange = torch.arange(self.L, device=device)
        self.tokens = torch.full((batch, new_tokens), int(pad), dtype=torch.long, device=device)
        self.log_probs = torch.zeros(batch, new_tokens, dtype=torch.float32, device=device)
        self.last = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.write = torch.zeros(1, dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.keep_kw = {}

    def prefill(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Fills cache columns ``0 .. P-1``; returns the float logits at the last prompt column."""
        causal = self.arange[None, :] <= torch.arange(self.P, device=input_ids.device)[:, None]  # [P, L]
        valid = causal[None] & self.base_valid[:, None, :]
        self.cache.index = torch.arange(self.P, device=input_ids.device)
        out = self.module(input_ids=input_ids, position_ids=position_ids, attention_mask=valid[:, None],
                          past_key_values=self.cache, use_cache=True, **self.keep_kw)
        self.pos.copy_(position_ids[:, -1:] + 1)
        self.write.fill_(self.P)
        return out.logits[:, -1].float()

    def advance(self, logits: torch.Tensor, generator) -> None:
        """Sample from ``logits [B, V]``, record token and log-prob in the current column, step on."""
        token, log_prob = sample_tokens(logits, generator=generator, **self.sampling)
        if not self.ignore_eos:
            token = torch.where(self.done, torch.full_like(token, self.pad), token)
        self.tokens.index_copy_(1, self.column, token[:, None])
        self.log_probs.index_copy_(1, self.column, log_prob[:, None])
        if not self.ignore_eos:
            self.done |= (token[:, None] == self.eos[None, :]).any(-1)
        self.last.copy_(token[:, None])
        self.column.add_(1)

    def step(self, generator) -> None:
        """One fixed-shape decode step (feeds ``last``, writes cache column ``write``); the unit
        that is captured in a CUDA graph."""
        valid = self.base_valid | ((self.arange >= self.P) & (self.arange <= self.write))
        self.cache.index = self.write
        out = self.module(input_ids=self.last, position_ids=self.pos, attention_mask=valid[:, None, None, :],
                          past_key_values=self.cache, use_cache=True)
        self.advance(out.logits[:, -1], generator)
        self.pos.add_(1)
        self.write.add_(1)


class StaticRollout(Rollout):
    """``StaticRollout(module, tokenizer, device, cuda_graph=True, sync_every=8, weights="auto", dtype=None)``.

    ``cuda_graph`` takes effect only on a CUDA device (``torch.cuda.is_available()``); ``weights``
    is ``auto``, ``shared`` or ``copy`` (module docstring); ``dtype`` is the dtype of that copy
    (default: the module's parameter dtype)."""

    def __init__(self, module: torch.nn.Module, tokenizer=None, device: Union[str, torch.device] = "cpu", *,
                 cuda_graph: bool = True, sync_every: int = 8, weights: str = "auto",
                 dtype: Optional[torch.dtype] = None):
        if int(sync_every) < 1:
            raise ValueError(f"rollout.static.sync_every must be >= 1, got {sync_every}")
        if weights not in ("auto", "shared", "copy"):
            raise ValueError(f"rollout.static.weights must be auto, shared or copy, got {weights!r}")
        self.module, self.tokenizer, self.device = module, tokenizer, torch.device(device)
        self.use_graph = bool(cuda_graph) and self.device.type == "cuda" and torch.cuda.is_available()
        self.sync_every = int(sync_every)
        self.dtype = dtype
        if weights == "auto":
            weights = "copy" if _is_fsdp(module) and (self.use_graph or not _is_sharded(module)) else "shared"
        if self.use_graph and weights == "shared" and _is_fsdp(module):
            raise ValueError("rollout.static.weights=shared cannot be captured in a CUDA graph on an FSDP2 module "
                             "(its all-gathers); use weights=auto/copy or rollout.static.cuda_graph=false")
        if weights == "copy" and hasattr(module, "peft_config"):
            raise ValueError("rollout.static.weights=copy cannot hold a LoRA-adapted module (actor.lora); use "
                             "rollout.static.weights=shared (and rollout.static.cuda_graph=false) or rollout.backend=hf")
        self.gather_weights = weights == "copy"
        self._copy: Optional[torch.nn.Module] = None
        _check_supported(module)
        register_attention()

    # ------------------------------------------------------------------ weights
    def _decode_module(self) -> torch.nn.Module:
        """The engine's module, or (``gather_weights``) the plain copy, refreshed in place."""
        if not self.gather_weights:
            return self.module
        from torch.distributed.tensor import DTensor
        from transformers import AutoModelForCausalLM

        if self._copy is None:
            dtype = self.dtype or next(self.module.parameters()).dtype
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.device(self.device), torch.random.fork_rng(devices=devices):
                copy = AutoModelForCausalLM.from_config(self.module.config, dtype=dtype)
            self._copy = copy.eval().requires_grad_(False)
        source = self.module.state_dict()
        with torch.no_grad():
            for name, target in self._copy.state_dict().items():
                value = source[name]
                target.copy_(value.full_tensor() if isinstance(value, DTensor) else value)
        return self._copy

    # ------------------------------------------------------------------ generate
    def generate(self, prompts: TensorDict, *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = -1, max_new_tokens: int, do_sample: bool = True,
                 eos_token_id: Optional[Union[int, Sequence[int]]] = None, pad_token_id: Optional[int] = None,
                 seed: Optional[int] = None, ignore_eos: bool = False) -> TensorDict:
        check_generate_args("StaticRollout", prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p)
        greedy = not do_sample or temperature == 0
        sampling = {"greedy": greedy, "temperature": 1.0 if greedy else float(temperature),
                    "top_k": 0 if top_k in (None, -1) else int(top_k), "top_p": float(top_p)}
        eos, pad = resolve_token_ids("StaticRollout", eos_token_id, pad_token_id, self.tokenizer, self.module)
        input_ids = prompts["input_ids"].repeat_interleave(n, dim=0).to(self.device)
        mask = prompts["attention_mask"].repeat_interleave(n, dim=0).to(self.device)
        positions = (prompts["position_ids"].repeat_interleave(n, dim=0).to(self.device)
                     if "position_ids" in prompts.keys() else (mask.long().cumsum(-1) - 1).clamp(min=0))
        if not bool(mask[:, -1].all()):
            raise ValueError("StaticRollout.generate: prompts must be left-padded (attention_mask[:, -1] all 1)")

        module = self._decode_module()
        was_training, attention = self.module.training, module.config._attn_implementation
        module.eval()
        module.config._attn_implementation = ATTENTION
        generator = None
        if not greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2 ** 62, (1,))))
        try:
            with torch.no_grad():
                tokens, log_probs = self._decode(module, input_ids, positions, mask, int(max_new_tokens),
                                                 sampling, eos, pad, bool(ignore_eos), generator, seed)
        finally:
            module.config._attn_implementation = attention
            self.module.train(was_training)
        return finish_rollout_batch(prompts, tokens, log_probs, n=n, eos_token_ids=eos, pad_token_id=pad,
                                    ignore_eos=ignore_eos)

    def _decode(self, module, input_ids, positions, mask, new_tokens, sampling, eos, pad, ignore_eos, generator,
                seed):
        run = _Decode(module, input_ids.shape[0], input_ids.shape[1], new_tokens, mask, self.device,
                      sampling=sampling, eos=eos, pad=pad, ignore_eos=ignore_eos)
        if _keeps_logits(module):
            run.keep_kw = {"logits_to_keep": 1}
        logits = run.prefill(input_ids, positions)
        graph = self._capture(run, generator) if self.use_graph and new_tokens > 1 else None
        if generator is not None and graph is not None:
            generator.manual_seed(int(seed) if seed is not None else generator.initial_seed())  # warm-up drew
        run.advance(logits, generator)
        group = _sync_group(module) if not ignore_eos and not self.gather_weights else None
        for step in range(1, new_tokens):
            if not ignore_eos and self._all_done(run, step, group, graph is not None):
                break
            if graph is not None:
                graph.replay()
            else:
                run.step(generator)
        if graph is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return run.tokens, run.log_probs

    def _all_done(self, run: _Decode, step: int, group, graphed: bool) -> bool:
        """Whether every row (on every rank of a sharded module) has said EOS. Under CUDA graphs
        the check (a host sync) runs every ``sync_every`` steps only."""
        if graphed and step % self.sync_every:
            return False
        if group is None:
            return bool(run.done.all())
        flag = run.done.all().to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        return bool(flag.item())

    @staticmethod
    def _warm_up(run: _Decode, generator, steps: int = 2) -> None:
        """Run ``min(steps, R - 1)`` decode steps (the cache has ``R - 1`` columns after the
        prompt), then undo their effect on the step state. What they wrote into the cache (columns
        ``P ..``) and the outputs is overwritten before it is read; the generator is reseeded by
        the caller."""
        state = (run.last, run.pos, run.write, run.column, run.done)
        saved = [t.clone() for t in state]
        for _ in range(min(steps, run.R - 1)):
            run.step(generator)
        for tensor, value in zip(state, saved):
            tensor.copy_(value)

    def _capture(self, run: _Decode, generator) -> "torch.cuda.CUDAGraph":
        """Warm the step up on a side stream (lazy inits, cuBLAS workspaces), then capture one
        step. Capturing records kernels without running them."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._warm_up(run, generator)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if generator is not None:
            if not hasattr(graph, "register_generator_state"):
                raise RuntimeError("StaticRollout: this torch cannot capture a seeded generator in a CUDA graph "
                                   "(CUDAGraph.register_generator_state); set rollout.static.cuda_graph=false")
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            run.step(generator)
        return graph


# ---------------------------------------------------------------------------------------- helpers
def _is_fsdp(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _keeps_logits(module: torch.nn.Module) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(type(module).forward).parameters


def _sync_group(module: torch.nn.Module):
    """The process group of a module sharded over > 1 rank (ranks must agree on the step count)."""
    if not _is_sharded(module):
        return None
    return next(module.parameters()).device_mesh.get_group()


def _check_supported(module: torch.nn.Module) -> None:
    config = getattr(module, "config", None)
    if config is None:
        raise TypeError(f"StaticRollout: {type(module).__name__} has no HF config; rollout.backend=static needs a "
                        "transformers causal LM")
    layer_types = getattr(config, "layer_types", None) or []
    if "sliding_attention" in layer_types or (getattr(config, "use_sliding_window", False)
                                              and getattr(config, "sliding_window", None)):
        raise ValueError("StaticRollout: sliding-window attention layers are not supported by rollout.backend=static; "
                         "use rollout.backend=hf")


def from_engine(engine, rollout, seed: int = 0) -> StaticRollout:
    """``rollout.backend=static`` on the engine's module with ``rollout.static.{cuda_graph,
    sync_every, weights}``; the copy's dtype is the engine's compute dtype."""
    opts = rollout.static
    engine_cfg = getattr(engine, "config", None)
    dtype = engine_cfg.torch_dtype(engine.device) if hasattr(engine_cfg, "torch_dtype") else None
    return StaticRollout(engine.module, engine.tokenizer, engine.device, cuda_graph=opts.cuda_graph,
                         sync_every=opts.sync_every, weights=opts.weights, dtype=dtype)
