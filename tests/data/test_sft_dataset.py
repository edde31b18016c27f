"""SFTDataset and collate_sft: right padding, exact loss_mask, over-long handling."""
import logging
import string

import pytest

from hybridflow.trainer.data import DataError, PromptLoader, SFTDataset, collate_sft


def ids(text):
    return [3 + string.printable.index(c) for c in text]


PAD, EOS = 0, 1
ROWS = [{"prompt": "1+2=", "response": "3"}, {"prompt": "10+20=", "response": "30"}]


def test_collate_right_pads_with_exact_loss_mask(char_tokenizer, parquet_file):
    ds = SFTDataset(parquet_file(ROWS), char_tokenizer, max_length=32)
    assert ds[0]["prompt_ids"] == ids("1+2=") and ds[0]["response_ids"] == ids("3") + [EOS]
    batch = ds.collate([ds[0], ds[1]])
    assert batch.batch["input_ids"].tolist() == [
        ids("1+2=3") + [EOS, PAD, PAD, PAD],
        ids("10+20=30") + [EOS],
    ]
    assert batch.batch["attention_mask"].tolist() == [[1] * 6 + [0] * 3, [1] * 9]
    assert batch.batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 5, 5, 5], list(range(9))]
    # 1 on response tokens incl. EOS; 0 on prompt and padding
    assert batch.batch["loss_mask"].tolist() == [[0, 0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1, 1]]
    assert batch.non_tensor_batch["index"].tolist() == [0, 1]


def test_chat_template_prompt(chat_tokenizer, jsonl_file):
    ds = SFTDataset(jsonl_file([{"prompt": [{"role": "user", "content": "hi"}], "response": "yo"}]), chat_tokenizer)
    row = ds[0]
    assert row["prompt_ids"] == ids("<user>hi|<assistant>")
    assert collate_sft([row], chat_tokenizer).batch["loss_mask"].sum().item() == 3  # "yo" + EOS


def test_overlong_filter_truncate_error(char_tokenizer, parquet_file, caplog):
    rows = [{"prompt": "1+2=", "response": "3"},            # 6 tokens with EOS
            {"prompt": "1+2=", "response": "333333"},       # 11 tokens
            {"prompt": "123456789=", "response": "1"}]     # prompt alone is 10 tokens
    path = parquet_file(rows)
    with caplog.at_level(logging.WARNING, logger="hybridflow.data"):
        filtered = SFTDataset(path, char_tokenizer, max_length=8)
    assert (len(filtered), filtered.num_filtered, filtered.num_truncated) == (1, 2, 0)
    assert any("dropped 2 and truncated 0" in r.getMessage() for r in caplog.records)

    truncated = SFTDataset(path, char_tokenizer, max_length=8, overlong="truncate")
    assert (len(truncated), truncated.num_filtered, truncated.num_truncated) == (2, 1, 1)
    assert truncated[1]["response_ids"] == ids("3333")  # cut from the right, EOS included in the cut
    assert collate_sft([truncated[1]], char_tokenizer).batch["input_ids"].shape == (1, 8)

    with pytest.raises(DataError, match=r"data\.parquet: row 1: example has 11 tokens > max_length=8"):
        SFTDataset(path, char_tokenizer, max_length=8, overlong="error")
    with pytest.raises(DataError, match="overlong must be"):
        SFTDataset(path, char_tokenizer, overlong="drop")


def test_sft_errors_name_file_and_row(char_tokenizer, jsonl_file):
    with pytest.raises(DataError, match=r"data\.jsonl: row 1 has no 'response' column"):
        SFTDataset(jsonl_file([{"prompt": "a", "response": "b"}, {"prompt": "c"}]), char_tokenizer)
    with pytest.raises(DataError, match=r"x\.jsonl: row 0: 'response' must be a string"):
        SFTDataset(jsonl_file([{"prompt": "a", "response": 3}], "x.jsonl"), char_tokenizer)
    with pytest.raises(DataError, match="no SFT examples left"):
        SFTDataset(jsonl_file([{"prompt": "abc", "response": "d"}], "y.jsonl"), char_tokenizer, max_length=2)


def test_custom_keys_and_loader(char_tokenizer, jsonl_file):
    rows = [{"q": f"{i}+0=", "a": str(i)} for i in range(6)]
    ds = SFTDataset(jsonl_file(rows), char_tokenizer, prompt_key="q", response_key="a")
    batch = PromptLoader(ds, 3, shuffle=False).next_batch()
    assert set(batch.batch.keys()) == {"input_ids", "attention_mask", "position_ids", "loss_mask"}
    assert batch.batch["loss_mask"].sum(dim=1).tolist() == [2, 2, 2]
