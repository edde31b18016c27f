import pickle

import numpy as np
import pytest
import torch

from hybridflow import DataProto


def make(n=6):
    return DataProto.from_dict(
        {"x": torch.arange(n * 2).view(n, 2), "h": torch.arange(n, dtype=torch.bfloat16)},
        {"uid": [f"u{i}" for i in range(n)], "extra": [{"i": i} for i in range(n)]},
        {"temperature": 0.7})


def test_from_dict_and_len():
    d = make()
    assert len(d) == 6 and set(d.keys()) == {"x", "h", "uid", "extra"}
    single = DataProto.from_single_dict({"a": torch.zeros(3), "b": ["p", "q", "r"]})
    assert list(single.batch.keys()) == ["a"] and list(single.non_tensor_batch["b"]) == ["p", "q", "r"]
    with pytest.raises(ValueError, match="different first dimensions"):
        DataProto.from_dict({"a": torch.zeros(3), "b": torch.zeros(4)})
    with pytest.raises(ValueError, match="non-tensor column 'b' has 2 rows"):
        DataProto.from_dict({"a": torch.zeros(3)}, {"b": [1, 2]})


def test_select_pop_rename():
    d = make()
    s = d.select(["x"], ["uid"])
    assert list(s.batch.keys()) == ["x"] and list(s.non_tensor_batch) == ["uid"]
    assert "h" in d  # select does not modify the source
    popped = d.pop(["h"], ["extra"])
    assert "h" not in d and "extra" not in d and "h" in popped and len(popped) == 6
    d.rename("x", "y").rename("uid", "id")
    assert set(d.keys()) == {"y", "id"}
    with pytest.raises(KeyError, match="no tensor column"):
        d.select(["nope"])
    with pytest.raises(KeyError, match="no column 'nope'"):
        d.rename("nope", "z")


def test_union_checks_consistency():
    d = make()
    other = DataProto.from_dict({"x": d.batch["x"].clone(), "z": torch.ones(6)}, {"w": list(range(6))})
    d.union(other)
    assert torch.equal(d.batch["z"], torch.ones(6)) and list(d.non_tensor_batch["w"]) == list(range(6))
    clash = DataProto.from_dict({"x": d.batch["x"] + 1})
    with pytest.raises(ValueError, match="tensor column 'x' differs"):
        d.union(clash)


def test_index_slice_reorder_mask():
    d = make()
    assert d[2].batch["x"].tolist() == [[4, 5]] and list(d[2].non_tensor_batch["uid"]) == ["u2"]
    assert list(d[1:3].non_tensor_batch["uid"]) == ["u1", "u2"]
    assert list(d[[5, 0]].non_tensor_batch["uid"]) == ["u5", "u0"]
    mask = torch.tensor([True, False, True, False, False, True])
    assert d[mask].batch["x"][:, 0].tolist() == [0, 4, 10]
    r = d.reorder(torch.tensor([3, 2, 1, 0, 5, 4]))
    assert list(r.non_tensor_batch["uid"]) == ["u3", "u2", "u1", "u0", "u5", "u4"]
    assert r.batch["x"][0].tolist() == [6, 7]


def test_chunk_split_concat_roundtrip():
    d = make()
    parts = d.chunk(3)
    assert [len(p) for p in parts] == [2, 2, 2]
    back = DataProto.concat(parts)
    assert torch.equal(back.batch["x"], d.batch["x"]) and list(back.non_tensor_batch["uid"]) == list(d.non_tensor_batch["uid"])
    assert [len(p) for p in d.split(4)] == [4, 2]
    with pytest.raises(ValueError, match="do not divide"):
        d.chunk(4)


def test_concat_merges_metrics_meta():
    a = DataProto.from_dict({"x": torch.zeros(1)}, meta_info={"metrics": {"loss": 1.0}, "same": 1, "t": 0.1})
    b = DataProto.from_dict({"x": torch.ones(1)}, meta_info={"metrics": {"loss": [2.0, 3.0]}, "same": 1, "t": 0.2})
    m = DataProto.concat([a, b]).meta_info
    assert m["metrics"] == {"loss": [1.0, 2.0, 3.0]} and m["same"] == 1 and m["t"] == [0.1, 0.2]


def test_repeat_interleaved_and_tiled():
    d = make(2)
    assert list(d.repeat(3).non_tensor_batch["uid"]) == ["u0", "u0", "u0", "u1", "u1", "u1"]
    assert list(d.repeat(2, interleave=False).non_tensor_batch["uid"]) == ["u0", "u1", "u0", "u1"]
    assert d.repeat(3).batch["x"][:, 0].tolist() == [0, 0, 0, 2, 2, 2]


def test_pad_to_divisor_and_unpad():
    d = make(5)
    padded, pad = d.pad_to_divisor(4)
    assert (len(padded), pad) == (8, 3)
    assert list(padded.non_tensor_batch["uid"][5:]) == ["u0", "u1", "u2"]
    restored = padded.unpad(pad)
    assert torch.equal(restored.batch["x"], d.batch["x"])
    same, zero = d.pad_to_divisor(5)
    assert same is d and zero == 0


def test_pickle_roundtrip_keeps_dtypes_and_objects():
    d = make()
    back = pickle.loads(pickle.dumps(d, protocol=5))
    assert back.batch["h"].dtype == torch.bfloat16 and torch.equal(back.batch["h"], d.batch["h"])
    assert torch.equal(back.batch["x"], d.batch["x"])
    assert back.non_tensor_batch["extra"][3] == {"i": 3} and back.meta_info == {"temperature": 0.7}


def test_pickle_sends_tensors_out_of_band():
    d = DataProto.from_dict({"x": torch.zeros(1000, 1000)})
    buffers = []
    payload = pickle.dumps(d, protocol=5, buffer_callback=buffers.append)
    assert len(payload) < 10_000  # the 4 MB tensor travels as a separate buffer
    assert sum(memoryview(b).nbytes for b in buffers) == 4_000_000
    back = pickle.loads(payload, buffers=buffers)
    assert back.batch["x"].shape == (1000, 1000)


def test_to_device_and_nbytes():
    d = make()
    assert d.to("cpu").batch["x"].device.type == "cpu"
    assert d.nbytes() == 12 * 8 + 6 * 2
    assert isinstance(d.non_tensor_batch["uid"], np.ndarray)
