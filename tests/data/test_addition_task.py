"""The quick start's addition task: files, determinism, disjointness, reward."""
import pyarrow.parquet as pq
import pytest

from hybridflow.trainer.data import PromptDataset, SFTDataset
from hybridflow.trainer.rewards import load_reward_function
from hybridflow.trainer.tasks.arithmetic import addition_reward, make_addition_data


def read(path):
    return pq.read_table(path).to_pylist()


def test_files_and_columns(tmp_path):
    paths = make_addition_data(tmp_path / "d", n_train=50, n_val=20, n_sft=30, digits=2, seed=0)
    assert set(paths) == {"train", "val", "sft"}
    train, val, sft = read(paths["train"]), read(paths["val"]), read(paths["sft"])
    assert (len(train), len(val), len(sft)) == (50, 20, 30)
    for row in train + val:
        a, b = row["prompt"].rstrip("=").split("+")
        assert row["prompt"] == f"{int(a)}+{int(b)}=" and 0 <= int(a) < 100 and 0 <= int(b) < 100
        assert row["ground_truth"] == str(int(a) + int(b))
        assert row["data_source"] == "addition"
    for row in sft:
        a, b = row["prompt"].rstrip("=").split("+")
        assert set(row) == {"prompt", "response"} and row["response"] == str(int(a) + int(b))


def test_deterministic_and_disjoint(tmp_path):
    one = make_addition_data(tmp_path / "a", n_train=200, n_val=100, n_sft=300, seed=5)
    two = make_addition_data(tmp_path / "b", n_train=200, n_val=100, n_sft=300, seed=5)
    other = make_addition_data(tmp_path / "c", n_train=200, n_val=100, n_sft=300, seed=6)
    for split in ("train", "val", "sft"):
        assert read(one[split]) == read(two[split])
    assert read(one["train"]) != read(other["train"])
    train = {r["prompt"] for r in read(one["train"])}
    val = {r["prompt"] for r in read(one["val"])}
    sft = {r["prompt"] for r in read(one["sft"])}
    assert len(train) == 200 and len(val) == 100 and len(sft) == 300  # no duplicates within a file
    assert not train & val and not sft & val


def test_whole_problem_space_and_limits(tmp_path):
    paths = make_addition_data(tmp_path, n_train=90, n_val=10, n_sft=90, digits=1)
    assert len({r["prompt"] for r in read(paths["train"]) + read(paths["val"])}) == 100
    with pytest.raises(ValueError, match="only 100 distinct problems"):
        make_addition_data(tmp_path, n_train=95, n_val=10, n_sft=0, digits=1)


def test_loads_into_the_datasets(tmp_path, char_tokenizer):
    paths = make_addition_data(tmp_path, n_train=8, n_val=4, n_sft=8, digits=3)
    train = PromptDataset(paths["train"], char_tokenizer, max_prompt_length=8)
    assert len(train) == 8 and train.num_filtered == 0  # "999+999=" is 8 characters
    assert train[0]["extra_info"]["split"] == "train"
    assert len(SFTDataset(paths["sft"], char_tokenizer, max_length=13)) == 8


@pytest.mark.parametrize("response, score", [
    ("46", 1.0), (" 46", 1.0), ("46<eos>", 1.0), ("46 is it", 1.0), ("46\n12", 1.0),
    ("4 6", 0.0), ("460", 0.0), ("", 0.0), ("+46", 0.0), ("45", 0.0),
])
def test_addition_reward(response, score):
    assert addition_reward("12+34=", response, "46") == score
    assert load_reward_function("builtin:addition")("12+34=", response, "46") == score


def test_addition_reward_is_exact_about_digits():
    assert addition_reward("12+33=", "045", "45") == 0.0  # no leading zeros
    assert addition_reward("0+0=", "0", "0") == 1.0
    assert addition_reward("0+0=", "0", 0) == 1.0  # ground truth may be an int
