"""Fixtures of the worker tests: batch builders in the contracts.md layout."""
import pytest
import torch
from tensordict import TensorDict


def _rl_batch(prompt_lens, response_lens, P=6, R=5, seed=0, vocab=(2, 258)):
    """Left-padded prompts + right-padded responses with the contracts.md columns."""
    g = torch.Generator().manual_seed(seed)
    B = len(prompt_lens)
    prompts = torch.zeros(B, P, dtype=torch.long)
    responses = torch.zeros(B, R, dtype=torch.long)
    pmask = torch.zeros(B, P, dtype=torch.long)
    rmask = torch.zeros(B, R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        prompts[i, P - p:] = torch.randint(*vocab, (p,), generator=g)
        pmask[i, P - p:] = 1
        responses[i, :r] = torch.randint(*vocab, (r,), generator=g)
        rmask[i, :r] = 1
    am = torch.cat([pmask, rmask], 1)
    return TensorDict({
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": am, "position_ids": (am.cumsum(-1) - 1).clamp(min=0),
        "response_mask": rmask.float(),
    }, batch_size=[B])


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models: one intra-op thread is faster, and far faster on a loaded 2-core machine
    (two spinning OpenMP threads per process slowed these tests ~20x under contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def make_rl_batch():
    """``make_rl_batch(prompt_lens, response_lens, P=6, R=5, seed=0) -> TensorDict``."""
    return _rl_batch


def token_mean_nll(mb, outputs):
    """Token-mean policy-gradient-like loss used across the engine tests: -mean(log p) on the mask."""
    mask = mb["response_mask"] if "response_mask" in mb.keys() else mb["loss_mask"]
    loss = -(outputs["log_probs"] * mask).sum() / mask.sum().clamp_min(1)
    return loss, {"loss": loss.detach()}


@pytest.fixture(scope="session")
def nll_loss():
    return token_mean_nll
