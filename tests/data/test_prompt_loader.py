"""PromptLoader: deterministic order from (seed, epoch), epochs, total_steps and exact resume."""
import itertools

import numpy as np
import pytest

from hybridflow.trainer.data import DataError, PromptDataset, PromptLoader


@pytest.fixture
def dataset(char_tokenizer, parquet_file):
    rows = [{"prompt": f"{i}+{i}=", "ground_truth": str(2 * i)} for i in range(10)]
    return PromptDataset(parquet_file(rows), char_tokenizer)


def indices(batch):
    return batch.non_tensor_batch["index"].tolist()


def take(loader, n):
    return [indices(b) for b in itertools.islice(iter(loader), n)]


def test_len_and_drop_last(dataset):
    assert len(PromptLoader(dataset, 3)) == 3
    assert len(PromptLoader(dataset, 3, drop_last=False)) == 4
    last = take(PromptLoader(dataset, 3, shuffle=False, drop_last=False), 4)[-1]
    assert last == [9]
    with pytest.raises(DataError, match="fewer than batch_size=11"):
        PromptLoader(dataset, 11)


def test_order_is_a_function_of_seed_and_epoch(dataset):
    a = take(PromptLoader(dataset, 3, seed=7), 9)  # three epochs
    b = take(PromptLoader(dataset, 3, seed=7), 9)
    assert a == b
    assert a != take(PromptLoader(dataset, 3, seed=8), 9)
    epochs = [sum(a[i:i + 3], []) for i in (0, 3, 6)]
    for e, served in enumerate(epochs):
        expected = np.random.default_rng([7, e]).permutation(10)[:9].tolist()
        assert served == expected
        assert len(set(served)) == 9  # no repeats within an epoch
    assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_no_shuffle_is_sequential(dataset):
    assert take(PromptLoader(dataset, 4, shuffle=False), 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]


def test_total_steps_stops_iteration(dataset):
    loader = PromptLoader(dataset, 3, total_steps=5)
    assert len(list(loader)) == 5
    assert list(loader) == []
    with pytest.raises(StopIteration):
        loader.next_batch()


def test_resume_continues_with_the_same_batches(dataset):
    reference = take(PromptLoader(dataset, 3, seed=3), 8)

    first = PromptLoader(dataset, 3, seed=3)
    assert take(first, 3) == reference[:3]
    state = first.state_dict()
    assert state == {"epoch": 0, "position": 3, "seed": 3}

    resumed = PromptLoader(dataset, 3, seed=123)  # the checkpoint's seed wins
    resumed.load_state_dict(state)
    assert indices(resumed.next_batch()) == reference[3]  # the 4th batch of an uninterrupted run
    assert take(resumed, 4) == reference[4:8]  # and the rest, across the epoch boundary
    assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["position"] == 2


def test_resume_mid_epoch_with_total_steps(dataset):
    loader = PromptLoader(dataset, 3, total_steps=5)
    take(loader, 2)
    again = PromptLoader(dataset, 3, total_steps=5)
    again.load_state_dict(loader.state_dict())
    assert len(list(again)) == 3


def test_load_state_dict_rejects_incomplete_state(dataset):
    with pytest.raises(DataError, match=r"lacks \['position'\]"):
        PromptLoader(dataset, 3).load_state_dict({"epoch": 0, "seed": 0})


def test_plain_sequences_need_a_collate_fn():
    with pytest.raises(DataError, match="list has no collate"):
        PromptLoader(list(range(8)), 2)
    loader = PromptLoader(list(range(8)), 2, shuffle=False, collate_fn=lambda rows: rows)
    assert loader.next_batch() == [0, 1]


def test_batches_are_collated_dataprotos(dataset):
    batch = PromptLoader(dataset, 4).next_batch()
    assert len(batch) == 4
    assert set(batch.batch.keys()) == {"input_ids", "attention_mask", "position_ids"}
    raws = list(batch.non_tensor_batch["raw_prompt"])
    assert raws == [dataset[i]["raw_prompt"] for i in indices(batch)]
