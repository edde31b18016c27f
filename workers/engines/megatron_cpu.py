"""Run megatron-core on a machine without CUDA (gloo process groups, CPU tensors).

megatron-core 0.16 assumes a CUDA device in a handful of places. :func:`cpu_patches` patches
them from the outside (never editing site-packages) for the duration of a ``with`` block, only
when ``torch.cuda.is_available()`` is False — on a GPU machine it does nothing. It is re-entrant
(nested blocks share one installation) and restores every patched attribute when the outermost
block exits, so code outside megatron calls never sees a patched torch. The megatron engine, the
hybrid engine's megatron side and the conversion helpers wrap their entry points with
:func:`on_cpu`, and the ``GPTModel``s they build run their ``forward`` inside the block
(:func:`scoped_forward`); other code that calls megatron itself opens the block::

    with cpu_patches():
        ...  # megatron-core calls

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
import functools
import importlib
import inspect
import sys
import types
from typing import Any, Callable, Iterator

import torch

__all__ = ["cpu_patches", "cpu_patches_active", "on_cpu", "scoped_forward"]

_DEPTH = 0          # open cpu_patches() blocks
_RESTORE: list = []  # (owner, attribute, original value) of the installed patches, in install order
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
    """True inside a :func:`cpu_patches` block on a machine without CUDA."""
    return _DEPTH > 0 and bool(_RESTORE)


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


@contextlib.contextmanager
def cpu_patches() -> Iterator[bool]:
    """Megatron runs on CPU inside this block (see the module docstring); yields whether the patches
    are active (False on a CUDA machine)."""
    global _DEPTH
    if torch.cuda.is_available():
        yield False
        return
    if _DEPTH == 0:
        _install()
    _DEPTH += 1
    try:
        yield True
    finally:
        _DEPTH -= 1
        if _DEPTH == 0:
            _uninstall()


def on_cpu(fn: Callable) -> Callable:
    """Run ``fn`` (a function, method or generator function) inside :func:`cpu_patches`."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            with cpu_patches():
                yield from fn(*args, **kwargs)
        return generator

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with cpu_patches():
            return fn(*args, **kwargs)
    return call


def scoped_forward(model: Any) -> Any:
    """``model`` (a megatron module this package built) with its ``forward`` inside :func:`cpu_patches`,
    so a caller may run it directly; returns the model."""
    model.forward = on_cpu(model.forward)
    return model


def _patch(owner: Any, name: str, value: Any) -> None:
    _RESTORE.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def _uninstall() -> None:
    while _RESTORE:
        owner, name, value = _RESTORE.pop()
        setattr(owner, name, value)


def _install() -> None:
    # 1. torch.cuda.current_device() -> cpu, for megatron callers only
    original_current_device = torch.cuda.current_device

    def current_device():
        if _from_megatron():
            return torch.device("cpu")
        return original_current_device()

    _patch(torch.cuda, "current_device", current_device)

    # 2. no CUDA RNG state to fork (dropout is 0 and weights come from a checkpoint)
    from megatron.core.tensor_parallel import random as tp_random

    def _null_fork(self, name=tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        return contextlib.nullcontext()

    _patch(tp_random.CudaRNGStatesTracker, "fork", _null_fork)

    # 3. device="cuda" factories in selected modules
    proxy = _TorchOnCPU()
    for name in _FACTORY_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            _patch(module, "torch", proxy)

    # 4. Tensor.type() reads as the CUDA type name for megatron's dtype checks
    original_type = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu" and _from_megatron():
            return _CUDA_TYPE_NAMES.get(self.dtype, original_type(self))
        if dtype is None and not kwargs:
            return original_type(self)
        return original_type(self, dtype, non_blocking, **kwargs)

    _patch(torch.Tensor, "type", tensor_type)

    # 5. Tensor.cuda() from megatron is the identity
    original_cuda = torch.Tensor.cuda

    def tensor_cuda(self, *args, **kwargs):
        if _from_megatron():
            return self
        return original_cuda(self, *args, **kwargs)

    _patch(torch.Tensor, "cuda", tensor_cuda)

    # 6. nothing to synchronise on CPU
    original_synchronize = torch.cuda.synchronize

    def synchronize(device=None):
        if _from_megatron():
            return None
        return original_synchronize(device)

    _patch(torch.cuda, "synchronize", synchronize)
