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
