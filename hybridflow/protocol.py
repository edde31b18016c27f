"""DataProto: the batch that moves between the controller and the worker groups.

A DataProto has three parts, all indexed by the same batch dimension of size ``len(data)``:

- ``batch``: a ``tensordict.TensorDict`` with a 1-D batch size (tensor columns),
- ``non_tensor_batch``: ``dict[str, np.ndarray]`` of object/numeric arrays of that length,
- ``meta_info``: a plain dict for everything that is not per-row (config, metrics, timing).

Pickling (Ray's transport) sends tensors as numpy buffers, so pickle protocol 5 can move them
out of band (zero-copy into Ray's object store) instead of copying tensor storages.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tensordict import TensorDict

# meta_info key used by the runtime to strip the rows it padded; never seen by users.
PAD_KEY = "_hybridflow_pad_rows"


def _as_object_array(values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    arr = np.empty(len(values), dtype=object)
    arr[:] = list(values)
    return arr


def _merge_meta(parts: Sequence[dict]) -> dict:
    """Merge meta_info of parts: equal values are kept once; ``metrics`` dicts are merged into
    ``{name: [value of part 0, value of part 1, ...]}``; other differing values become a list in
    part order."""
    merged: dict = {}
    keys = [k for part in parts for k in part]
    for key in dict.fromkeys(keys):
        values = [part[key] for part in parts if key in part]
        if key == "metrics":
            out: dict = {}
            for value in values:
                for name, v in value.items():
                    out.setdefault(name, []).extend(v if isinstance(v, list) else [v])
            merged[key] = out
        elif all(_equal(values[0], v) for v in values[1:]):
            merged[key] = values[0]
        else:
            merged[key] = values
    return merged


def _equal(a: Any, b: Any) -> bool:
    try:
        result = a == b
        return bool(result.all()) if hasattr(result, "all") else bool(result)
    except Exception:  # noqa: BLE001 - values that cannot be compared count as different
        return False


class DataProto:
    """A batch of rows: tensors (TensorDict), numpy columns and a meta dict."""

    def __init__(self, batch: TensorDict | None = None, non_tensor_batch: dict | None = None,
                 meta_info: dict | None = None):
        self.batch = batch
        self.non_tensor_batch = {k: _as_object_array(v) for k, v in (non_tensor_batch or {}).items()}
        self.meta_info = dict(meta_info or {})
        self._check_consistency()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, tensors: dict | None = None, non_tensors: dict | None = None,
                  meta_info: dict | None = None) -> "DataProto":
        """Build from ``{name: tensor}`` (all with the same first dimension) and ``{name: array}``."""
        batch = None
        if tensors:
            sizes = {k: v.shape[0] for k, v in tensors.items()}
            if len(set(sizes.values())) != 1:
                raise ValueError(f"DataProto.from_dict: tensors have different first dimensions: {sizes}")
            batch = TensorDict(dict(tensors), batch_size=[next(iter(sizes.values()))])
        return cls(batch, non_tensors, meta_info)

    @classmethod
    def from_single_dict(cls, data: dict, meta_info: dict | None = None) -> "DataProto":
        """Split one dict by value type: tensors → batch, everything else → non_tensor_batch."""
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in data.items() if not isinstance(v, torch.Tensor)}
        return cls.from_dict(tensors, others, meta_info)

    def _check_consistency(self) -> None:
        if self.batch is not None and len(self.batch.batch_size) != 1:
            raise ValueError(f"DataProto.batch must have a 1-D batch size, got {self.batch.batch_size}")
        n = len(self)
        for key, value in self.non_tensor_batch.items():
            if len(value) != n:
                raise ValueError(f"DataProto: non-tensor column {key!r} has {len(value)} rows, batch has {n}")

    def __len__(self) -> int:
        if self.batch is not None:
            return int(self.batch.batch_size[0])
        if self.non_tensor_batch:
            return len(next(iter(self.non_tensor_batch.values())))
        return 0

    def keys(self) -> list[str]:
        return list(self.batch.keys() if self.batch is not None else []) + list(self.non_tensor_batch)

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def __repr__(self) -> str:
        tensors = {k: tuple(v.shape) for k, v in (self.batch.items() if self.batch is not None else [])}
        return (f"DataProto(len={len(self)}, tensors={tensors}, non_tensors={list(self.non_tensor_batch)}, "
                f"meta={list(self.meta_info)})")

    # ----------------------------------------------------------------- columns
    def select(self, batch_keys: Iterable[str] | None = None, non_tensor_keys: Iterable[str] | None = None,
               meta_keys: Iterable[str] | None = None) -> "DataProto":
        """A new DataProto with only the named columns (None keeps all of that part)."""
        batch = self.batch
        if batch is not None and batch_keys is not None:
            batch = batch.select(*self._require(batch_keys, list(batch.keys()), "tensor"))
        non_tensor = self.non_tensor_batch
        if non_tensor_keys is not None:
            non_tensor = {k: non_tensor[k] for k in self._require(non_tensor_keys, list(non_tensor), "non-tensor")}
        meta = self.meta_info if meta_keys is None else {k: self.meta_info[k] for k in meta_keys}
        return DataProto(batch, dict(non_tensor), dict(meta))

    def pop(self, batch_keys: Iterable[str] = (), non_tensor_keys: Iterable[str] = (),
            meta_keys: Iterable[str] = ()) -> "DataProto":
        """Remove the named columns from self and return them as a new DataProto."""
        batch_keys, non_tensor_keys = list(batch_keys), list(non_tensor_keys)
        batch = None
        if batch_keys:
            self._require(batch_keys, list(self.batch.keys()) if self.batch is not None else [], "tensor")
            batch = TensorDict({k: self.batch.pop(k) for k in batch_keys}, batch_size=self.batch.batch_size)
        non_tensor = {k: self.non_tensor_batch.pop(k)
                      for k in self._require(non_tensor_keys, list(self.non_tensor_batch), "non-tensor")}
        meta = {k: self.meta_info.pop(k) for k in meta_keys}
        return DataProto(batch, non_tensor, meta)

    def rename(self, old: str, new: str) -> "DataProto":
        """Rename a column in place (tensor or non-tensor); returns self."""
        if self.batch is not None and old in self.batch.keys():
            self.batch.rename_key_(old, new)
        elif old in self.non_tensor_batch:
            self.non_tensor_batch[new] = self.non_tensor_batch.pop(old)
        else:
            raise KeyError(f"DataProto.rename: no column {old!r}; columns are {self.keys()}")
        return self

    @staticmethod
    def _require(keys: Iterable[str], present: list[str], kind: str) -> list[str]:
        keys = list(keys)
        missing = [k for k in keys if k not in present]
        if missing:
            raise KeyError(f"DataProto: no {kind} column(s) {missing}; present: {present}")
        return keys

    def union(self, other: "DataProto") -> "DataProto":
        """Add other's columns to self (in place; returns self). A column present in both must hold
        equal values, otherwise ValueError names it."""
        if len(self) != len(other) and len(self) and len(other):
            raise ValueError(f"DataProto.union: lengths differ ({len(self)} vs {len(other)})")
        if other.batch is not None:
            if self.batch is None:
                self.batch = other.batch
            else:
                for key, value in other.batch.items():
                    if key in self.batch.keys() and not torch.equal(self.batch[key], value):
                        raise ValueError(f"DataProto.union: tensor column {key!r} differs between the two batches")
                    self.batch[key] = value
        for key, value in other.non_tensor_batch.items():
            if key in self.non_tensor_batch and not np.array_equal(self.non_tensor_batch[key], value):
                raise ValueError(f"DataProto.union: non-tensor column {key!r} differs between the two batches")
            self.non_tensor_batch[key] = value
        for key, value in other.meta_info.items():
            if key in self.meta_info and not _equal(self.meta_info[key], value):
                raise ValueError(f"DataProto.union: meta_info[{key!r}] differs between the two batches")
            self.meta_info[key] = value
        return self

    # ----------------------------------------------------------------- rows
    def __getitem__(self, index: Any) -> "DataProto":
        """Rows by int, slice, list/array of ints, bool mask or index tensor (always a DataProto)."""
        if isinstance(index, (int, np.integer)):
            index = slice(int(index), int(index) + 1) if index != -1 else slice(-1, None)
        if isinstance(index, slice):
            np_index: Any = index
            batch = self.batch[index] if self.batch is not None else None
        else:
            tensor_index = torch.as_tensor(np.asarray(index))
            if tensor_index.dtype == torch.bool:
                tensor_index = tensor_index.nonzero().flatten()
            np_index = tensor_index.numpy()
            batch = self.batch[tensor_index] if self.batch is not None else None
        non_tensor = {k: v[np_index] for k, v in self.non_tensor_batch.items()}
        return DataProto(batch, non_tensor, dict(self.meta_info))

    def reorder(self, indices: Sequence[int] | torch.Tensor) -> "DataProto":
        """Rows in the given order (a permutation or any index list)."""
        return self[torch.as_tensor(indices)]

    def split(self, split_size: int) -> list["DataProto"]:
        """Consecutive pieces of ``split_size`` rows (the last may be shorter)."""
        return [self[i:i + split_size] for i in range(0, len(self), split_size)]

    def chunk(self, chunks: int) -> list["DataProto"]:
        """``chunks`` equal consecutive pieces; the length must divide (see pad_to_divisor)."""
        if len(self) % chunks:
            raise ValueError(f"DataProto.chunk: {len(self)} rows do not divide into {chunks} chunks; "
                             "use pad_to_divisor first")
        return self.split(len(self) // chunks)

    @staticmethod
    def concat(parts: Sequence["DataProto"]) -> "DataProto":
        """Rows of all parts in order. meta_info is merged (see ``_merge_meta``)."""
        parts = list(parts)
        if not parts:
            raise ValueError("DataProto.concat: nothing to concatenate")
        batches = [p.batch for p in parts if p.batch is not None]
        batch = torch.cat(batches, dim=0) if batches else None
        non_tensor = {k: np.concatenate([p.non_tensor_batch[k] for p in parts])
                      for k in parts[0].non_tensor_batch}
        return DataProto(batch, non_tensor, _merge_meta([p.meta_info for p in parts]))

    def repeat(self, times: int, interleave: bool = True) -> "DataProto":
        """Repeat rows: interleaved ``[a, a, b, b]`` (n samples per prompt) or tiled ``[a, b, a, b]``."""
        index = torch.arange(len(self))
        index = index.repeat_interleave(times) if interleave else index.repeat(times)
        return self[index]

    def pad_to_divisor(self, divisor: int) -> tuple["DataProto", int]:
        """Append copies of the first rows until ``len`` divides ``divisor``; returns (data, pad)."""
        pad = (-len(self)) % divisor
        if pad == 0:
            return self, 0
        index = torch.arange(pad) % len(self)
        return DataProto.concat([self, self[index]]), pad

    def unpad(self, pad: int) -> "DataProto":
        """Drop the last ``pad`` rows (inverse of pad_to_divisor)."""
        return self[: len(self) - pad] if pad else self

    def to(self, device: str | torch.device) -> "DataProto":
        if self.batch is not None:
            self.batch = self.batch.to(device)
        return self

    def copy(self) -> "DataProto":
        """Shallow copy of the column containers (tensors are shared)."""
        batch = self.batch.clone(False) if self.batch is not None else None
        return DataProto(batch, dict(self.non_tensor_batch), dict(self.meta_info))

    # ----------------------------------------------------------------- pickling
    def __getstate__(self) -> dict:
        tensors = None
        if self.batch is not None:
            tensors = {}
            for key, value in self.batch.items():
                value = value.detach().cpu().contiguous()
                dtype = value.dtype
                if dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
                    value = value.view(torch.int16 if dtype == torch.bfloat16 else torch.uint8)
                tensors[key] = (value.numpy(), str(dtype).removeprefix("torch."), str(self.batch[key].device))
        return {"tensors": tensors, "size": len(self) if self.batch is not None else None,
                "non_tensor": self.non_tensor_batch, "meta": self.meta_info}

    def __setstate__(self, state: dict) -> None:
        batch = None
        if state["tensors"] is not None:
            columns = {}
            for key, (array, dtype, _device) in state["tensors"].items():
                value = torch.from_numpy(array) if array.flags.writeable else torch.from_numpy(array.copy())
                target = getattr(torch, dtype)
                columns[key] = value.view(target) if value.dtype != target else value
            batch = TensorDict(columns, batch_size=[state["size"]])
        self.batch = batch
        self.non_tensor_batch = state["non_tensor"]
        self.meta_info = state["meta"]

    def nbytes(self) -> int:
        """Bytes held by the tensor columns (what a transfer moves, roughly)."""
        if self.batch is None:
            return 0
        return sum(v.numel() * v.element_size() for v in self.batch.values())


def pad_rows_in_chunks(total: int, chunks: int, pad: int) -> list[int]:
    """How many of the ``pad`` padding rows (at the end of ``total`` rows) fall in each chunk."""
    size = total // chunks
    first_pad = total - pad
    return [max(0, min(size, (i + 1) * size - first_pad)) for i in range(chunks)]
