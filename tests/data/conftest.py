"""Fixtures for the data tests: local character-level tokenizers (never downloaded) and writers
for small parquet/jsonl files."""
from __future__ import annotations

import json
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<unk>"]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def make_char_tokenizer(*, chat_template: str | None = None, with_pad: bool = True) -> PreTrainedTokenizerFast:
    """One token per character (printable ASCII); ids 0/1/2 = <pad>/<eos>/<unk>."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    kwargs = {"pad_token": "<pad>"} if with_pad else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", **kwargs)
    if chat_template:
        tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="session")
def char_tokenizer():
    return make_char_tokenizer()


@pytest.fixture(scope="session")
def chat_tokenizer():
    return make_char_tokenizer(chat_template=CHAT_TEMPLATE)


def write_parquet(path, rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist reads the keys of row 0 only
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def parquet_file(tmp_path):
    """``parquet_file(rows, name="data.parquet") -> path``"""
    return lambda rows, name="data.parquet": write_parquet(tmp_path / name, rows)


@pytest.fixture
def jsonl_file(tmp_path):
    """``jsonl_file(rows, name="data.jsonl") -> path``"""
    return lambda rows, name="data.jsonl": write_jsonl(tmp_path / name, rows)


@pytest.fixture
def tokenizer_factory():
    return make_char_tokenizer
