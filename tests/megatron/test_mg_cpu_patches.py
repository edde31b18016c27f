"""The CPU patches of megatron-core are scoped: installed by the outermost ``cpu_patches()`` block
(or an ``@on_cpu`` entry point), shared by nested blocks, and removed when it exits, so torch
outside megatron calls is never the patched one."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.megatron


def test_patches_exist_only_inside_the_block():
    if torch.cuda.is_available():
        pytest.skip("the patches are for machines without CUDA")
    import megatron.core.utils as mutils

    from hybridflow.workers.engines.megatron_cpu import cpu_patches, cpu_patches_active, on_cpu

    original = (torch.cuda.current_device, torch.Tensor.type, torch.Tensor.cuda, torch.cuda.synchronize, mutils.torch)
    assert not cpu_patches_active() and mutils.torch is torch
    with cpu_patches() as active:
        assert active and cpu_patches_active()
        assert torch.cuda.current_device is not original[0] and mutils.torch is not torch
        with cpu_patches():  # nested: the same installation
            assert torch.cuda.current_device is not original[0]
        assert cpu_patches_active() and mutils.torch is not torch  # still the outer block's
    assert (torch.cuda.current_device, torch.Tensor.type, torch.Tensor.cuda, torch.cuda.synchronize,
            mutils.torch) == original
    assert not cpu_patches_active()

    @on_cpu
    def entry():
        return cpu_patches_active()

    @on_cpu
    def weights():
        yield cpu_patches_active()
        yield cpu_patches_active()

    assert entry() and not cpu_patches_active()
    assert list(weights()) == [True, True] and not cpu_patches_active()
    with pytest.raises(ZeroDivisionError):  # an exception inside still removes them
        with cpu_patches():
            1 / 0
    assert torch.cuda.current_device is original[0]
