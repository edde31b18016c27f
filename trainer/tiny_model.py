"""Tiny models the repository owns: a character-level tokenizer and a random Qwen2 checkpoint.

Used by the quick start and by every test, so nothing is ever downloaded. Both are built
locally and deterministically:

* :func:`build_tokenizer` — one token per character (per UTF-8 byte): ids ``0 = <pad>``,
  ``1 = <eos>`` (also bos), then ``2 + b`` for every byte value ``b`` (258 tokens), so digits,
  ``+-*=?:. ``, letters and any other text are covered and ``decode(encode(text)) == text``
  (no spaces inserted; ASCII text is exactly one token per character).
* :func:`build_tiny_checkpoint` — a randomly initialised ``Qwen2ForCausalLM`` (seeded) saved
  with ``save_pretrained`` (safetensors) together with the tokenizer, loadable by
  ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.

Why byte-level BPE with no merges rather than a WordLevel model: transformers 5's
``AutoTokenizer`` always rebuilds a ``model_type == "qwen2"`` tokenizer as ``Qwen2Tokenizer``
(byte-level BPE with its own pre-tokenizer), whatever ``tokenizer_config.json`` says. A WordLevel
vocabulary reloads wrongly there (spaces silently dropped). Building the tokenizer *as* a
``Qwen2Tokenizer`` over the 256 byte symbols with an empty merge list makes the in-memory and
the reloaded tokenizer identical.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional

__all__ = ["SPECIAL_TOKENS", "byte_symbols", "build_tokenizer", "build_tiny_checkpoint", "is_complete_checkpoint"]

SPECIAL_TOKENS = ("<pad>", "<eos>")

_CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def byte_symbols() -> list:
    """The byte-level alphabet: element ``b`` is the printable symbol standing for byte ``b``
    (printable Latin-1 bytes stand for themselves, the others for ``chr(256 + k)`` in order)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("\xa1"), ord("\xac") + 1)) \
        | set(range(ord("\xae"), ord("\xff") + 1))
    symbols, shifted = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def build_tokenizer(out_dir: Optional[str] = None):
    """Character-level tokenizer (a ``PreTrainedTokenizerFast``; concretely ``Qwen2Tokenizer``).

    Vocabulary: ``<pad>`` = 0, ``<eos>`` = 1 (eos, bos), byte ``b`` = ``2 + b``; no merges, so
    each UTF-8 byte is one token. Padding side is left (prompts are left-padded, see
    docs/design/contracts.md). If ``out_dir`` is given the tokenizer is saved there too.
    """
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in byte_symbols():
        vocab[symbol] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<eos>", bos_token="<eos>",
                               pad_token="<pad>", padding_side="left")
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"build_tokenizer: expected {len(vocab)} tokens, transformers built {len(tokenizer)}")
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def is_complete_checkpoint(path: str) -> bool:
    """True when ``path`` holds every file :func:`build_tiny_checkpoint` writes."""
    return all(os.path.isfile(os.path.join(path, name)) for name in _CHECKPOINT_FILES)


def build_tiny_checkpoint(out_dir: str, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                          num_kv_heads: int = 2, intermediate_size: int = 128,
                          max_position_embeddings: int = 64, seed: int = 0,
                          tie_word_embeddings: bool = True) -> str:
    """Write a random ``Qwen2ForCausalLM`` + the char tokenizer to ``out_dir``; return ``out_dir``.

    Weights are ``torch.manual_seed(seed)`` + the model's own init (std 0.02), stored in float32.
    Idempotent: if ``out_dir`` already holds a complete checkpoint it is returned untouched
    (the shape arguments are not re-checked). The files are written into a temporary sibling
    folder and moved into place, so concurrent builders never see a half-written checkpoint.
    """
    if is_complete_checkpoint(out_dir):
        return out_dir
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"build_tiny_checkpoint: hidden_size={hidden_size} must divide by num_heads={num_heads} "
                         f"and num_heads by num_kv_heads={num_kv_heads}")
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.eos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)

    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tiny_ckpt_", dir=parent)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if is_complete_checkpoint(out_dir):  # another builder finished first
            return out_dir
        if os.path.isdir(out_dir):  # incomplete leftovers: replace them
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir
