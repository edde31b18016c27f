import os

import torch

from hybridflow.trainer.tiny_model import build_tiny_checkpoint, build_tokenizer


def test_tokenizer_is_char_level_and_round_trips():
    tok = build_tokenizer()
    text = "what is 12+7? answer: 19.  a-b*c=d\nXyZ"
    ids = tok(text)["input_ids"]
    assert ids == [b + 2 for b in text.encode()]  # one token per character
    assert tok.decode(ids) == text  # no spaces inserted
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == text
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<pad>", "<eos>", "<eos>")
    assert tok.padding_side == "left"
    assert tok.decode(tok("héllo")["input_ids"]) == "héllo"  # non-ASCII via UTF-8 bytes


def test_checkpoint_reloads_in_transformers_and_is_idempotent(tiny_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    text = "1 + 2 = 3"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok(text)["input_ids"] == build_tokenizer()(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.vocab_size == len(tok) and model.config.num_hidden_layers == 2
    assert model.config.tie_word_embeddings
    mtime = os.path.getmtime(os.path.join(tiny_ckpt, "model.safetensors"))
    assert build_tiny_checkpoint(tiny_ckpt, hidden_size=32) == tiny_ckpt  # complete: untouched
    assert os.path.getmtime(os.path.join(tiny_ckpt, "model.safetensors")) == mtime
    # same seed -> same weights; another seed -> different weights
    other = AutoModelForCausalLM.from_pretrained(build_tiny_checkpoint(str(tmp_path / "a"), seed=0))
    third = AutoModelForCausalLM.from_pretrained(build_tiny_checkpoint(str(tmp_path / "b"), seed=1))
    w = model.model.embed_tokens.weight
    assert torch.equal(w, other.model.embed_tokens.weight)
    assert not torch.equal(w, third.model.embed_tokens.weight)
