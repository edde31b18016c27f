"""Run megatron-core on a machine without CUDA (gloo process groups, CPU tensors).

megatron-core 0.16 assumes a CUDA device in a handful of places. :func:`apply_cpu_patches`
patches them from the outside (never editing site-packages), idempotently, and only when
``torch.cuda.is_available()`` is False — on a GPU machine it does nothing. Call it before
building any megatron model or optimizer (the megatron engine and the conversion helpers do).

What is patched, and why each is safe on CPU:

1. ``torch.cuda.current_device()`` — megatron passes it as ``device=`` everywhere; when called
   from a ``megatron.*`` module it returns ``torch.device("cpu")`` (other callers get torch's own
   behaviour).
2. ``CudaRNGStatesTracker.fork`` — swaps the CUDA RNG state around tensor-parallel dropout and
   initialisation; it becomes a null context. Correct only because every dropout is 0 on this
   path (the engine sets ``attention_dropout = hidden_dropout = 0``) and the weights are loaded
   from a checkpoint, so no model-parallel RNG stream is ever consumed.
3. Hard-coded ``device="cuda"`` in the factories (``zeros/ones/empty/tensor/full``…) of a few
   modules (schedules, optimizer, clip_grads, grad_scaler, utils, transformer.utils,
   param_and_grad_buffer, distrib_optimizer, pipeline_parallel.utils): those modules get a
   ``torch`` proxy whose factories rewrite a CUDA device to CPU; everything else forwards to torch.
4. ``Tensor.type()`` without arguments, called from ``megatron.*``, reads as the CUDA type name
   (``torch.cuda.FloatTensor``…) so the optimizer / clip_grads dtype checks accept CPU params.
5. ``Tensor.cuda()`` called from ``megatron.*`` (tied embeddings with PP > 1) is the identity.
6. ``torch.cuda.synchronize()`` called from ``megatron.*`` (the shape exchange of the pipeline
   schedule with ``variable_seq_lengths``) does nothing: CPU collectives are synchronous.

Not supported on CPU (megatron needs CUDA-only pieces for them): ``sequence_parallel``,
Transformer Engine layer specs, fused kernels, ``enable_autocast``.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import types

import torch

__all__ = ["apply_cpu_patches", "cpu_patches_active"]

_APPLIED = False

#: modules whose ``torch.<factory>(..., device="cuda")`` calls are redirected to CPU
_FACTORY_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.utils",
    "megatron.core.transformer.utils",
    "megatron.core.distributed.param_and_grad_buffer",
)
_FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange", "rand", "randn", "as_tensor")
_CUDA_TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
                    torch.bfloat16: "torch.cuda.BFloat16Tensor", torch.float64: "torch.cuda.DoubleTensor",
                    torch.int64: "torch.cuda.LongTensor", torch.int32: "torch.cuda.IntTensor",
                    torch.uint8: "torch.cuda.ByteTensor", torch.bool: "torch.cuda.BoolTensor"}


def cpu_patches_active() -> bool:
    """True once :func:`apply_cpu_patches` has patched megatron (never on a CUDA machine)."""
    return _APPLIED


def _from_megatron(depth: int = 2) -> bool:
    frame = sys._getframe(depth)
    return frame is not None and str(frame.f_globals.get("__name__", "")).startswith("megatron.")


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


class _TorchOnCPU(types.ModuleType):
    """Stands in for ``torch`` inside a megatron module: factories map a CUDA device to CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name in _FACTORIES:
            def factory(*args, _fn=value, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                kwargs.pop("pin_memory", None)
                return _fn(*args, **kwargs)
            return factory
        return value


def apply_cpu_patches() -> bool:
    """Make megatron-core run on CPU (see the module docstring). Idempotent; a no-op returning
    False when CUDA is available; returns True when the patches are (now) active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True

    # 1. torch.cuda.current_device() -> cpu, for megatron callers only
    original_current_device = torch.cuda.current_device

    def current_device():
        if _from_megatron():
            return torch.device("cpu")
        return original_current_device()

    torch.cuda.current_device = current_device

    # 2. no CUDA RNG state to fork (dropout is 0 and weights come from a checkpoint)
    from megatron.core.tensor_parallel import random as tp_random

    def _null_fork(self, name=tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        return contextlib.nullcontext()

    tp_random.CudaRNGStatesTracker.fork = _null_fork

    # 3. device="cuda" factories in selected modules
    proxy = _TorchOnCPU()
    for name in _FACTORY_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = proxy

    # 4. Tensor.type() reads as the CUDA type name for megatron's dtype checks
    original_type = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu" and _from_megatron():
            return _CUDA_TYPE_NAMES.get(self.dtype, original_type(self))
        if dtype is None and not kwargs:
            return original_type(self)
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = tensor_type

    # 5. Tensor.cuda() from megatron is the identity
    original_cuda = torch.Tensor.cuda

    def tensor_cuda(self, *args, **kwargs):
        if _from_megatron():
            return self
        return original_cuda(self, *args, **kwargs)

    torch.Tensor.cuda = tensor_cuda

    # 6. nothing to synchronise on CPU
    original_synchronize = torch.cuda.synchronize

    def synchronize(device=None):
        if _from_megatron():
            return None
        return original_synchronize(device)

    torch.cuda.synchronize = synchronize
    _APPLIED = True
    return True
