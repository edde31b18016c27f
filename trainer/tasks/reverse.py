"""The quick start's task: write a string of digits backwards.

``"40213="`` → ``"31204"``. The reward is an exact match (``builtin:exact_match``). A tiny
transformer learns it from scratch in about a hundred SFT steps on a CPU, so the quick start can
stop SFT half-way (roughly 40 % greedy accuracy) and let GRPO do the rest: the point is to see RL
raise a verifiable reward within minutes, not the difficulty of the task. (Multi-digit addition,
:mod:`.arithmetic`, needs thousands of steps before a model this small starts to get it right.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _rows(codes: np.ndarray, length: int, split: str) -> list[dict]:
    rows = []
    for i, code in enumerate(codes.tolist()):
        digits = f"{int(code):0{length}d}"
        rows.append({"prompt": f"{digits}=", "ground_truth": digits[::-1], "data_source": "reverse",
                     "extra_info": {"split": split, "index": i}})
    return rows


def make_reverse_data(out_dir: str | Path, *, n_train: int, n_val: int, n_sft: int, length: int = 5,
                      seed: int = 0) -> dict[str, str]:
    """Write ``train.parquet``, ``val.parquet`` (columns ``prompt``, ``ground_truth``,
    ``data_source``, ``extra_info``) and ``sft.parquet`` (``prompt``, ``response``) under
    ``out_dir``; the three splits hold disjoint digit strings of ``length`` digits. Returns
    ``{"train": path, "val": path, "sft": path}``; the files depend only on the arguments."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    space = 10 ** length
    if n_train + n_val + n_sft > space:
        raise ValueError(f"make_reverse_data: only {space} distinct {length}-digit strings; "
                         f"asked for {n_train + n_val + n_sft}")
    codes = np.random.default_rng(seed).choice(space, size=n_train + n_val + n_sft, replace=False)
    splits = {"train": codes[:n_train], "val": codes[n_train:n_train + n_val], "sft": codes[n_train + n_val:]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, split_codes in splits.items():
        rows = _rows(split_codes, length, name)
        if name == "sft":
            rows = [{"prompt": r["prompt"], "response": r["ground_truth"]} for r in rows]
        paths[name] = str(out / f"{name}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), paths[name])
    return paths


#: How :func:`make_reverse_pairs` corrupts the correct answer ``c`` into the rejected one.
PAIR_KINDS = ("noisy", "digit", "two_digits", "repeat", "swap", "unreversed", "rotate", "truncate", "extend")


def _corrupt(digits: str, rng: np.random.Generator) -> tuple[str, str]:
    """(kind, a plausible wrong answer) for the prompt digits ``digits``; never the right one."""
    right = digits[::-1]
    kind = "noisy" if rng.random() < 1 / 3 else PAIR_KINDS[int(rng.integers(1, len(PAIR_KINDS)))]
    i = int(rng.integers(len(right) - 1))
    if kind == "noisy":  # each digit, with probability 0.4, becomes a neighbour's, the prompt's there, or any
        n = len(right)
        options = [[right[max(k - 1, 0)], right[min(k + 1, n - 1)], digits[k], str(int(rng.integers(10)))]
                   for k in range(n)]
        wrong = "".join(options[k][int(rng.integers(4))] if rng.random() < 0.4 else right[k] for k in range(n))
    elif kind == "two_digits":
        a, b = sorted(rng.choice(len(right), size=2, replace=False).tolist())
        wrong = "".join(str((int(c) + int(rng.integers(1, 10))) % 10) if k in (a, b) else c
                        for k, c in enumerate(right))
    elif kind == "repeat":  # a digit written twice, its neighbour lost
        wrong = right[:i] + right[i + int(rng.integers(2))] * 2 + right[i + 2:]
    elif kind == "swap":
        wrong = right[:i] + right[i + 1] + right[i] + right[i + 2:]
    elif kind == "unreversed":
        wrong = digits
    elif kind == "rotate":
        wrong = right[1:] + right[0] if rng.integers(2) else right[-1] + right[:-1]
    elif kind == "truncate":
        wrong = right[:-int(rng.integers(1, 3))]
    elif kind == "extend":
        wrong = right + str(int(rng.integers(10)))
    else:
        wrong = right
    if wrong == right:  # "digit", or a string the others leave unchanged (e.g. "11111")
        kind, i = "digit", int(rng.integers(len(right)))
        wrong = right[:i] + str((int(right[i]) + int(rng.integers(1, 10))) % 10) + right[i + 1:]
    return kind, wrong


def make_reverse_pairs(out_dir: str | Path, *, n_train: int, n_val: int, length: int = 5,
                       seed: int = 0) -> dict[str, str]:
    """Preference pairs for reward-model training: write ``pairs_train.parquet`` and
    ``pairs_val.parquet`` under ``out_dir`` (disjoint digit strings); return ``{"train", "val"}``
    paths. Columns: ``prompt`` (``"40213="``), ``chosen`` (the reversal ``"31204"``), ``rejected``
    (a wrong answer) and ``kind``, how it is wrong, from :data:`PAIR_KINDS`: a third are ``noisy``
    (each digit, with probability 0.4, replaced by a neighbour's, by the prompt's digit at that
    place or by a random one), the rest drawn uniformly from the others: one or two digits changed, a digit repeated over its neighbour, two adjacent digits swapped, the
    digits left unreversed, rotated by one, the last one or two digits cut off, a digit appended.
    Same digits, same length, or both differ, so no surface feature separates chosen from
    rejected: a reward model must check the rule. The files depend only on the arguments."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if length < 2:
        raise ValueError(f"make_reverse_pairs: length must be >= 2, got {length}")
    if n_train + n_val > 10 ** length:
        raise ValueError(f"make_reverse_pairs: only {10 ** length} distinct {length}-digit strings; "
                         f"asked for {n_train + n_val}")
    rng = np.random.default_rng([seed, 7])
    codes = rng.choice(10 ** length, size=n_train + n_val, replace=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, split_codes in (("train", codes[:n_train]), ("val", codes[n_train:])):
        rows = []
        for code in split_codes.tolist():
            digits = f"{int(code):0{length}d}"
            kind, wrong = _corrupt(digits, rng)
            rows.append({"prompt": f"{digits}=", "chosen": digits[::-1], "rejected": wrong, "kind": kind})
        paths[name] = str(out / f"pairs_{name}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), paths[name])
    return paths
