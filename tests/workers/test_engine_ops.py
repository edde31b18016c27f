import math

import pytest
import torch

import hybridflow.workers.engines.ops as ops
from hybridflow.workers.engines.ops import lr_factor, partition_micro_batches, token_log_probs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_log_probs_matches_log_softmax_entropy_and_gradients(temperature, monkeypatch):
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 12)  # chunks of 2 rows
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 6, (2, 3), generator=g)
    lp, ent = token_log_probs(logits, labels, temperature, with_entropy=True)
    ref = torch.log_softmax(logits / temperature, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(lp, ref)
    torch.testing.assert_close(ent, torch.distributions.Categorical(logits=logits / temperature).entropy())
    # hand-written backward == autograd of the reference, for both outputs
    assert torch.autograd.gradcheck(lambda x: token_log_probs(x, labels, temperature, True), (logits,))
    assert torch.autograd.gradcheck(lambda x: token_log_probs(x, labels, temperature, False)[0], (logits,))


def test_token_log_probs_bf16_input_gives_float32():
    logits = torch.randn(2, 3, 11).to(torch.bfloat16)
    lp, ent = token_log_probs(logits, torch.zeros(2, 3, dtype=torch.long), 1.0)
    assert lp.dtype == torch.float32 and ent is None
    torch.testing.assert_close(lp, torch.log_softmax(logits.float(), -1)[..., 0])


def test_partition_by_rows_and_by_token_budget():
    lengths = [5, 3, 8, 1, 2]
    assert partition_micro_batches(lengths) == [[0, 1, 2, 3, 4]]
    assert partition_micro_batches(lengths, micro_batch_size=2) == [[0, 1], [2, 3], [4]]
    groups = partition_micro_batches(lengths, max_tokens=8)
    assert sorted(i for g in groups for i in g) == list(range(5))
    assert all(sum(lengths[i] for i in g) <= 8 for g in groups)
    assert len(groups) == 3  # 19 tokens need at least 3 bins of 8
    assert partition_micro_batches([20, 1], max_tokens=8) == [[0], [1]]  # over-long row alone
    assert all(len(g) <= 1 for g in partition_micro_batches(lengths, max_tokens=100, micro_batch_size=1))


def test_partition_forced_count_splits_then_pads_with_dummies():
    groups = partition_micro_batches([4, 4, 4, 4], max_tokens=100, num_micro_batches=3)
    assert len(groups) == 3 and sorted(i for g in groups for i in g) == [0, 1, 2, 3]
    assert partition_micro_batches([4, 4], micro_batch_size=1, num_micro_batches=4) == [[0], [1], None, None]
    with pytest.raises(ValueError):
        partition_micro_batches([1, 1, 1], micro_batch_size=1, num_micro_batches=2)


def test_lr_factor_warmup_then_decay():
    kw = dict(warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    assert [lr_factor(s, schedule="constant", **kw) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    lin = [lr_factor(s, schedule="linear", **kw) for s in range(7)]
    assert lin[:3] == [0.5, 1.0, 1.0]
    assert lin[3] == pytest.approx(0.1 + 0.9 * 0.75) and lin[6] == pytest.approx(0.1)
    cos = [lr_factor(s, schedule="cosine", **kw) for s in range(7)]
    assert cos[4] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cos[6] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="total_steps"):
        lr_factor(3, schedule="cosine")
