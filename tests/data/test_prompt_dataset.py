"""PromptDataset reading, chat templates, over-long filtering, DataError paths and collation."""
import logging
import string

import numpy as np
import pytest
import torch

from hybridflow.protocol import DataProto
from hybridflow.trainer.data import DataError, PromptDataset, collate_prompts


def ids(text):
    """Token ids of the test char tokenizer (see conftest)."""
    return [3 + string.printable.index(c) for c in text]


ROWS = [
    {"prompt": "1+2=", "ground_truth": "3", "data_source": "add", "extra_info": {"k": 1}},
    {"prompt": "10+20=", "reward_model": {"ground_truth": "30"}},
    {"prompt": "7+0=", "ground_truth": "7", "data_source": "add"},
]


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_reads_parquet_and_jsonl(kind, char_tokenizer, parquet_file, jsonl_file):
    path = parquet_file(ROWS) if kind == "parquet" else jsonl_file(ROWS)
    ds = PromptDataset(path, char_tokenizer, max_prompt_length=16)
    assert len(ds) == 3 and ds.num_filtered == 0
    assert [r["raw_prompt"] for r in ds] == ["1+2=", "10+20=", "7+0="]
    assert ds[0]["prompt_ids"] == ids("1+2=")
    assert [r["ground_truth"] for r in ds] == ["3", "30", "7"]  # reward_model.ground_truth accepted
    assert [r["data_source"] for r in ds] == ["add", "unknown", "add"]
    assert ds[0]["extra_info"] == {"k": 1} and ds[1]["extra_info"] == {}
    assert [r["index"] for r in ds] == [0, 1, 2]


def test_ground_truth_of_any_type(char_tokenizer, jsonl_file):
    rows = [{"prompt": "a", "ground_truth": 7}, {"prompt": "b", "ground_truth": ["x", "y"]}, {"prompt": "c"}]
    ds = PromptDataset(jsonl_file(rows), char_tokenizer)
    assert [r["ground_truth"] for r in ds] == [7, ["x", "y"], None]
    assert list(ds.collate(list(ds)).non_tensor_batch["ground_truth"]) == [7, ["x", "y"], None]


def test_several_files_are_concatenated(char_tokenizer, parquet_file, jsonl_file):
    ds = PromptDataset([parquet_file(ROWS[:2]), jsonl_file(ROWS[2:])], char_tokenizer)
    assert [r["raw_prompt"] for r in ds] == ["1+2=", "10+20=", "7+0="]
    assert [r["index"] for r in ds] == [0, 1, 2]


def test_chat_messages_use_the_template(chat_tokenizer, parquet_file, jsonl_file):
    rows = [{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "1+1="}],
             "ground_truth": "2"},
            {"prompt": [{"role": "user", "content": "3+3="}], "ground_truth": "6"}]
    ds = PromptDataset(parquet_file(rows), chat_tokenizer)  # list<struct> column read back as dicts
    assert ds[0]["raw_prompt"] == "<system>s|<user>1+1=|<assistant>"
    assert ds[1]["raw_prompt"] == "<user>3+3=|<assistant>"
    assert ds[0]["prompt_ids"] == ids("<system>s|<user>1+1=|<assistant>")
    plain = jsonl_file([{"prompt": "2+2="}])
    # a plain string is wrapped as one user message when the tokenizer has a template ...
    assert PromptDataset(plain, chat_tokenizer)[0]["raw_prompt"] == "<user>2+2=|<assistant>"
    # ... and used raw when templates are switched off
    assert PromptDataset(plain, chat_tokenizer, apply_chat_template=False)[0]["raw_prompt"] == "2+2="


def test_chat_messages_without_template_name_the_file(char_tokenizer, jsonl_file):
    path = jsonl_file([{"prompt": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"data\.jsonl: row 0.*chat template"):
        PromptDataset(path, char_tokenizer)
    with pytest.raises(DataError, match="chat template"):
        PromptDataset(jsonl_file([{"prompt": "hi"}], "b.jsonl"), char_tokenizer, apply_chat_template=True)


def test_overlong_prompts_are_filtered_and_counted(char_tokenizer, parquet_file, caplog):
    rows = [{"prompt": "1+2="}, {"prompt": "123456+654321="}, {"prompt": "9+9="}, {"prompt": "12345+1="}]
    with caplog.at_level(logging.WARNING, logger="hybridflow.data"):
        ds = PromptDataset(parquet_file(rows), char_tokenizer, max_prompt_length=7)
    assert ds.num_filtered == 2
    assert [r["raw_prompt"] for r in ds] == ["1+2=", "9+9="]
    assert [r["index"] for r in ds] == [0, 1]
    assert any("filtered 2 of 4" in rec.getMessage() for rec in caplog.records)


def test_overlong_without_filter_raises_with_file_and_row(char_tokenizer, parquet_file):
    path = parquet_file([{"prompt": "1+2="}, {"prompt": "123456+654321="}])
    with pytest.raises(DataError, match=r"data\.parquet: row 1: prompt has 14 tokens > max_prompt_length=7"):
        PromptDataset(path, char_tokenizer, max_prompt_length=7, filter_overlong=False)


def test_all_filtered_is_an_error(char_tokenizer, parquet_file):
    with pytest.raises(DataError, match=r"data\.parquet.*no prompts left"):
        PromptDataset(parquet_file([{"prompt": "123456789"}]), char_tokenizer, max_prompt_length=3)


def test_data_error_paths(char_tokenizer, tmp_path, parquet_file, jsonl_file):
    assert issubclass(DataError, ValueError)
    with pytest.raises(DataError, match=r"not found: .*missing\.parquet"):
        PromptDataset(tmp_path / "missing.parquet", char_tokenizer)
    csv = tmp_path / "data.csv"
    csv.write_text("prompt\nhi\n")
    with pytest.raises(DataError, match=r"data\.csv: unsupported data file extension '\.csv'"):
        PromptDataset(csv, char_tokenizer)
    with pytest.raises(DataError, match=r"data\.parquet: row 0 has no 'prompt' column.*'question'"):
        PromptDataset(parquet_file([{"question": "hi"}]), char_tokenizer)
    with pytest.raises(DataError, match=r"data\.jsonl: row 1 has no 'prompt' column"):
        PromptDataset(jsonl_file([{"prompt": "a"}, {"text": "b"}]), char_tokenizer)
    with pytest.raises(DataError, match=r"nulls\.jsonl: row 1: 'prompt' is null"):
        PromptDataset(jsonl_file([{"prompt": "a"}, {"prompt": None}], "nulls.jsonl"), char_tokenizer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file has no rows"):
        PromptDataset(empty, char_tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        PromptDataset(bad, char_tokenizer)
    with pytest.raises(DataError, match=r"row 0: prompt must be a string"):
        PromptDataset(jsonl_file([{"prompt": 5}], "num.jsonl"), char_tokenizer)
    with pytest.raises(DataError, match="no data files"):
        PromptDataset([], char_tokenizer)


def test_custom_prompt_key(char_tokenizer, jsonl_file):
    ds = PromptDataset(jsonl_file([{"question": "5+5=", "ground_truth": "10"}]), char_tokenizer, prompt_key="question")
    assert ds[0]["raw_prompt"] == "5+5="


def test_collate_left_pads_with_exact_position_ids(char_tokenizer, parquet_file):
    ds = PromptDataset(parquet_file(ROWS), char_tokenizer)
    batch = ds.collate([ds[0], ds[1], ds[2]])
    assert isinstance(batch, DataProto) and len(batch) == 3
    pad = char_tokenizer.pad_token_id
    assert batch.batch["input_ids"].tolist() == [
        [pad, pad] + ids("1+2="),
        ids("10+20="),
        [pad, pad] + ids("7+0="),
    ]
    assert batch.batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 1, 1, 1, 1]]
    assert batch.batch["position_ids"].tolist() == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]]
    assert batch.batch["input_ids"].dtype == torch.long
    assert list(batch.non_tensor_batch["raw_prompt"]) == ["1+2=", "10+20=", "7+0="]
    assert list(batch.non_tensor_batch["ground_truth"]) == ["3", "30", "7"]
    assert list(batch.non_tensor_batch["data_source"]) == ["add", "unknown", "add"]
    assert list(batch.non_tensor_batch["extra_info"]) == [{"k": 1}, {}, {}]
    assert batch.non_tensor_batch["index"].tolist() == [0, 1, 2]
    # pad width follows the batch's longest prompt only
    assert batch[0:1].batch["input_ids"].shape == (1, 6)
    assert ds.collate([ds[2], ds[0]]).batch["input_ids"].shape == (2, 4)


def test_collate_without_pad_token_falls_back_to_eos(tokenizer_factory, caplog):
    tok = tokenizer_factory(with_pad=False)
    rows = [{"raw_prompt": "ab", "index": 4}, {"raw_prompt": "abc", "index": 9}]
    with caplog.at_level(logging.INFO, logger="hybridflow.data"):
        batch = collate_prompts(rows, tok, max_prompt_length=8)
    assert batch.batch["input_ids"][0, 0].item() == tok.eos_token_id
    assert batch.batch["input_ids"][0, 1:].tolist() == ids("ab")
    assert batch.non_tensor_batch["index"].tolist() == [4, 9]
    assert any("eos" in rec.getMessage() for rec in caplog.records)
    with pytest.raises(DataError, match="3 tokens > max_prompt_length=2"):
        collate_prompts(rows, tok, max_prompt_length=2)


def test_non_tensor_columns_survive_dataproto_ops(char_tokenizer, parquet_file):
    ds = PromptDataset(parquet_file(ROWS), char_tokenizer)
    batch = ds.collate(list(ds)).repeat(2)
    assert list(batch.non_tensor_batch["ground_truth"]) == ["3", "3", "30", "30", "7", "7"]
    assert isinstance(batch.non_tensor_batch["extra_info"], np.ndarray)
