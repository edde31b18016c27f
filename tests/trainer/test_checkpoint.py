"""CheckpointManager: atomic saves, crash safety, pruning, resume resolution."""
import json
import os

import pytest

from hybridflow.trainer.checkpoint import CheckpointManager, resolve_resume


def _save_fn(payload="weights"):
    def fn(tmp_dir):
        assert os.path.basename(tmp_dir).startswith(".tmp-")
        os.makedirs(os.path.join(tmp_dir, "actor"))
        with open(os.path.join(tmp_dir, "actor", "model.pt"), "w") as f:
            f.write(payload)
    return fn


def test_save_load_latest(tmp_path):
    mgr = CheckpointManager(tmp_path)
    assert mgr.latest() is None
    state = {"dataloader": {"epoch": 1, "index": 8}, "kl_ctl": {"value": 0.001}, "seed": 3}
    path = mgr.save(5, _save_fn(), state)
    assert path == tmp_path / "checkpoints" / "step_5"
    assert (path / "actor" / "model.pt").read_text() == "weights"
    assert CheckpointManager.load(path) == {**state, "step": 5}
    mgr.save(12, _save_fn(), {"seed": 4})
    assert mgr.latest() == (12, tmp_path / "checkpoints" / "step_12")  # numeric, not lexical order
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_12", "step_5"]


def test_crash_in_save_fn_leaves_previous_latest(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _save_fn(), {})

    def crashing(tmp_dir):
        _save_fn()(tmp_dir)
        raise RuntimeError("worker died while saving")

    with pytest.raises(RuntimeError, match="worker died"):
        mgr.save(2, crashing, {})
    assert not (tmp_path / "checkpoints" / "step_2").exists()
    assert mgr.latest()[0] == 1
    assert os.listdir(tmp_path / "checkpoints") == ["step_1"]


def test_leftover_tmp_dir_ignored_then_cleaned(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, None, {"a": 1})
    # a process killed mid-save: tmp dir with a complete-looking controller.json
    leftover = tmp_path / "checkpoints" / ".tmp-step_2"
    leftover.mkdir()
    (leftover / "controller.json").write_text(json.dumps({"step": 2}))
    (tmp_path / "checkpoints" / "step_3").mkdir()  # no controller.json: incomplete, ignored
    assert mgr.latest() == (1, tmp_path / "checkpoints" / "step_1")
    assert resolve_resume("auto", tmp_path) == tmp_path / "checkpoints" / "step_1"
    mgr.save(2, None, {"a": 2})
    assert not leftover.exists()
    assert mgr.latest()[0] == 2 and CheckpointManager.load(mgr.latest()[1])["a"] == 2


def test_keep_last_prunes_oldest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        mgr.save(step, _save_fn(), {})
    assert [s for s, _ in mgr.checkpoints()] == [3, 4]
    # resuming from an older step and saving never deletes the checkpoint just written
    mgr = CheckpointManager(tmp_path, keep_last=1)
    path = mgr.save(2, None, {})
    assert path.exists() and [s for s, _ in mgr.checkpoints()] == [2]
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_resave_same_step_replaces(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(3, _save_fn("old"), {"v": 1})
    path = mgr.save(3, _save_fn("new"), {"v": 2})
    assert (path / "actor" / "model.pt").read_text() == "new" and CheckpointManager.load(path)["v"] == 2
    assert os.listdir(tmp_path / "checkpoints") == ["step_3"]


def test_save_validates_before_calling_workers(tmp_path):
    mgr = CheckpointManager(tmp_path)
    called = []
    with pytest.raises(TypeError, match="JSON"):
        mgr.save(1, called.append, {"obj": object()})
    with pytest.raises(ValueError, match="differs"):
        mgr.save(1, called.append, {"step": 2})
    with pytest.raises(ValueError, match="step"):
        mgr.save(-1, called.append, {})
    assert called == [] and mgr.latest() is None


def test_resolve_resume(tmp_path):
    assert resolve_resume("auto", tmp_path) is None
    assert resolve_resume("never", tmp_path) is None and resolve_resume(None, tmp_path) is None
    path = CheckpointManager(tmp_path).save(7, None, {})
    assert resolve_resume("auto", tmp_path) == path
    assert resolve_resume("never", tmp_path) is None
    assert resolve_resume(str(path), tmp_path / "other") == path
    with pytest.raises(FileNotFoundError, match="does not exist.*'auto', 'never'"):
        resolve_resume(str(tmp_path / "missing"), tmp_path)
    with pytest.raises(ValueError, match="not a checkpoint directory.*did you mean .*step_7"):
        resolve_resume(str(tmp_path), tmp_path)
    (tmp_path / "checkpoints" / ".tmp-step_8").mkdir()
    with pytest.raises(ValueError, match="incomplete"):
        resolve_resume(str(tmp_path / "checkpoints" / ".tmp-step_8"), tmp_path)
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        CheckpointManager.load(tmp_path)
