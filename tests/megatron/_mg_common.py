"""Shared pieces of the megatron tests: the test batch, the loss, the multi-rank launcher."""
import os
import sys

import torch
from tensordict import TensorDict

# the repository root, so that worker subprocesses (run as scripts) import the shared launcher too
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.gloo_launch import launch as _launch  # noqa: E402

STEPS = 4
LR = 1e-2
VALUE_LR = 1e-3  # value models overshoot (chaotic loss) at LR


def rl_batch(B=8, P=6, R=5, seed=0):
    """Left-padded prompts + right-padded responses (docs/design/contracts.md columns)."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = [int(x) for x in torch.randint(2, P + 1, (B,), generator=g)]
    response_lens = [int(x) for x in torch.randint(1, R + 1, (B,), generator=g)]
    prompts, responses = torch.zeros(B, P, dtype=torch.long), torch.zeros(B, R, dtype=torch.long)
    pmask, rmask = torch.zeros(B, P, dtype=torch.long), torch.zeros(B, R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        prompts[i, P - p:] = torch.randint(2, 258, (p,), generator=g)
        pmask[i, P - p:] = 1
        responses[i, :r] = torch.randint(2, 258, (r,), generator=g)
        rmask[i, :r] = 1
    am = torch.cat([pmask, rmask], 1)
    return TensorDict({"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
                       "attention_mask": am, "position_ids": (am.cumsum(-1) - 1).clamp(min=0),
                       "response_mask": rmask.float()}, batch_size=[B])


def nll(mb, outputs):
    """Token-mean -log p minus a small entropy bonus (exercises the entropy gradient too)."""
    mask = mb["response_mask"]
    lp = (outputs["log_probs"] * mask).sum() / mask.sum()
    ent = (outputs["entropy"] * mask).sum() / mask.sum()
    loss = -lp - 0.01 * ent
    return loss, {"loss": loss.detach()}


def global_loss(engine, batch):
    """The token-mean NLL of the whole batch under the engine's current weights (no grad)."""
    out = engine.forward(batch, with_entropy=False)
    mask = batch["response_mask"]
    return float(-(out["log_probs"] * mask).sum() / mask.sum())


def train_trace(engine, full_batch, shard):
    """``STEPS`` optimizer steps on ``shard``; the global loss of ``full_batch`` before each step
    and after the last."""
    trace = []
    for _ in range(STEPS):
        trace.append(global_loss(engine, full_batch))
        engine.train_batch(shard, nll, with_entropy=True)
    trace.append(global_loss(engine, full_batch))
    return trace


def value_loss(mb, outputs):
    """Token-mean squared error of the values against a fixed target of 1."""
    mask = mb["response_mask"]
    loss = ((outputs["values"] - 1.0) ** 2 * mask).sum() / mask.sum()
    return loss, {"vf": loss.detach()}


def value_trace(engine, full_batch, shard):
    """Like :func:`train_trace` for a value model: the global value loss around ``STEPS`` steps."""
    def measure():
        out = engine.forward(full_batch)
        return float(value_loss(full_batch, out)[0])

    trace = []
    for _ in range(STEPS):
        trace.append(measure())
        engine.train_batch(shard, value_loss)
    trace.append(measure())
    return trace


def launch(script, world, args, timeout=600):
    """``script args`` on ``world`` gloo ranks (tests/gloo_launch.py), with a 5-minute collective timeout."""
    return _launch(script, world, args, timeout, HYBRIDFLOW_COLLECTIVE_TIMEOUT_S=300)


def _single_rank():
    from hybridflow.workers.engines.megatron import init_megatron_parallel

    init_megatron_parallel(1, 1)


try:
    import pytest

    @pytest.fixture
    def mg_single():
        """This process as a world of one with megatron's parallel state at tp = pp = 1."""
        _single_rank()
        torch.set_num_threads(1)
        yield
except ImportError:  # pragma: no cover - run as a worker script without pytest
    pass
