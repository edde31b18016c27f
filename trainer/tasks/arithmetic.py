"""The quick start's synthetic task: add two integers.

Prompts are compact (``"12+34="``) so that a character-level tokenizer (digits, ``+``, ``=`` and a
few specials) and a tiny transformer can learn the task in minutes on a CPU. The answer is the
decimal sum (``"46"``), which :func:`addition_reward` checks exactly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_MAX_DIGITS = 9  # operand pairs are coded as one int64: a * 10**digits + b


def addition_reward(prompt: str, response: str, ground_truth: Any, **extra: Any) -> float:
    """1.0 if the response's leading digits (after leading whitespace, up to the first non-digit
    or whitespace) equal ``str(ground_truth)``, else 0.0. So ``"46"``, ``" 46<eos>"`` and
    ``"46 is it"`` score 1.0 for ground truth ``"46"``; ``"4 6"``, ``"460"`` and ``""`` score 0.0.
    Also available as ``builtin:addition``."""
    text = str(response).lstrip()
    end = 0
    while end < len(text) and text[end] in "0123456789":
        end += 1
    return 1.0 if end and text[:end] == str(ground_truth).strip() else 0.0


def _problem_rows(codes: np.ndarray, digits: int, split: str) -> list[dict]:
    base = 10 ** digits
    rows = []
    for i, code in enumerate(codes.tolist()):
        a, b = divmod(int(code), base)
        rows.append({"prompt": f"{a}+{b}=", "ground_truth": str(a + b), "data_source": "addition",
                     "extra_info": {"split": split, "index": i, "a": a, "b": b}})
    return rows


def make_addition_data(out_dir: str | Path, *, n_train: int, n_val: int, n_sft: int, digits: int = 2,
                       seed: int = 0) -> dict[str, str]:
    """Write ``train.parquet``, ``val.parquet`` and ``sft.parquet`` under ``out_dir``; return
    ``{"train": path, "val": path, "sft": path}``.

    Operands are uniform in ``[0, 10**digits)``. Train and val rows have columns ``prompt``
    (``"12+34="``), ``ground_truth`` (``"46"``), ``data_source`` (``"addition"``) and
    ``extra_info`` (``{"split", "index", "a", "b"}``); SFT rows have ``prompt`` and ``response``
    (the answer). All problems within a file are distinct, train and val share none, and SFT
    shares none with val (it may overlap train). The files depend only on the arguments.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not 1 <= digits <= _MAX_DIGITS:
        raise ValueError(f"make_addition_data: digits must be in 1..{_MAX_DIGITS}, got {digits}")
    if min(n_train, n_val, n_sft) < 0:
        raise ValueError(f"make_addition_data: sizes must be >= 0, got n_train={n_train}, n_val={n_val}, n_sft={n_sft}")
    space = 10 ** (2 * digits)
    if n_train + n_val > space or n_sft + n_val > space:
        raise ValueError(f"make_addition_data: {digits}-digit operands give only {space} distinct problems; "
                         f"n_train + n_val = {n_train + n_val}, n_sft + n_val = {n_sft + n_val}")
    rng = np.random.default_rng(seed)
    codes = rng.choice(space, size=n_val + n_train, replace=False)
    val_codes, train_codes = codes[:n_val], codes[n_val:]
    # SFT: distinct problems outside val; draw n_val extra so that n_sft remain after removing val.
    sft_pool = rng.choice(space, size=min(space, n_sft + n_val), replace=False)
    sft_codes = sft_pool[~np.isin(sft_pool, val_codes)][:n_sft]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.parquet", "val": out / "val.parquet", "sft": out / "sft.parquet"}
    extra = pa.struct([("split", pa.string()), ("index", pa.int64()), ("a", pa.int64()), ("b", pa.int64())])
    schema = pa.schema([("prompt", pa.string()), ("ground_truth", pa.string()), ("data_source", pa.string()),
                        ("extra_info", extra)])
    pq.write_table(pa.Table.from_pylist(_problem_rows(train_codes, digits, "train"), schema=schema), paths["train"])
    pq.write_table(pa.Table.from_pylist(_problem_rows(val_codes, digits, "val"), schema=schema), paths["val"])
    sft_rows = [{"prompt": r["prompt"], "response": r["ground_truth"]} for r in _problem_rows(sft_codes, digits, "sft")]
    pq.write_table(pa.Table.from_pylist(sft_rows, schema=pa.schema([("prompt", pa.string()), ("response", pa.string())])),
                   paths["sft"])
    return {name: str(path) for name, path in paths.items()}
