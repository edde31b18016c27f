"""Tracker backends: jsonl rows, resume truncation, tensorboard events, optional-backend errors."""
import json
import logging
import sys
import types

import numpy as np
import pytest
import torch

from hybridflow.trainer.tracking import METRICS_FILE, Tracker, read_metrics


def test_jsonl_one_row_per_step_plain_values(tmp_path):
    tracker = Tracker(tmp_path, backends=("jsonl",))
    tracker.log({"reward/mean": torch.tensor(0.5), "response_length/mean": np.float32(12.0),
                 "throughput/total_tokens": np.int64(7), "actor/kl_ref": float("nan")}, step=1)
    # flushed immediately: readable before close
    assert read_metrics(tmp_path) == [{"step": 1, "reward/mean": 0.5, "response_length/mean": 12.0,
                                       "throughput/total_tokens": 7, "actor/kl_ref": None}]
    tracker.log({"reward/mean": 1.0, "x": float("inf")}, step=2)
    tracker.close()
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[1]) == {"step": 2, "reward/mean": 1.0, "x": None}
    assert "NaN" not in lines[0] and "Infinity" not in lines[1]


def test_log_rejects_bad_values(tmp_path):
    with Tracker(tmp_path, backends=("jsonl",)) as tracker:
        with pytest.raises(TypeError, match="'loss'.*reduce_metrics"):
            tracker.log({"loss": [1.0, 2.0]}, step=0)
        with pytest.raises(TypeError, match="step"):
            tracker.log({"a": 1.0}, step=1.5)
    assert not (tmp_path / METRICS_FILE).read_text()


def test_resume_truncates_later_steps(tmp_path):
    with Tracker(tmp_path, backends=("jsonl",)) as tracker:
        for step in range(1, 6):
            tracker.log({"reward/mean": step / 10}, step=step)
    with Tracker(tmp_path, backends=("jsonl",), resume_step=3) as tracker:
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
        tracker.log({"reward/mean": 0.9}, step=4)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["reward/mean"] == 0.9


def test_read_metrics_skips_truncated_last_line(tmp_path, caplog):
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "a": 1}\n{"step": 2, "a"')
    with caplog.at_level(logging.WARNING):
        assert read_metrics(tmp_path) == [{"step": 1, "a": 1}]
    assert "truncated" in caplog.text
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "a"\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_metrics(tmp_path / "nope")


def test_console_one_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="hybridflow.trainer"):
        with Tracker(tmp_path, backends=("console",)) as tracker:
            tracker.log({"reward/mean": 0.123456, "timing/step_s": 2.0, "other": 1.0}, step=7)
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 7")]
    assert line == ["step 7 | reward/mean 0.1235 | timing/step_s 2 | +1 more"]
    assert not (tmp_path / METRICS_FILE).exists()


def test_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    with Tracker(tmp_path, backends=("jsonl", "tensorboard"), config={"lr": 1e-6}) as tracker:
        tracker.log({"reward/mean": 0.25, "note": "text ignored"}, step=1)
        tracker.log({"reward/mean": 0.75}, step=2)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    scalars = acc.Scalars("reward/mean")
    assert [(s.step, s.value) for s in scalars] == [(1, 0.25), (2, 0.75)]


def test_unknown_backend_lists_valid(tmp_path):
    with pytest.raises(ValueError, match="'neptune'.*valid.*'jsonl'.*'wandb'"):
        Tracker(tmp_path, backends=("jsonl", "neptune"))
    assert not (tmp_path / METRICS_FILE).exists()


@pytest.mark.parametrize("backend", ["wandb", "mlflow", "tensorboard"])
def test_missing_backend_names_the_extra(tmp_path, monkeypatch, backend):
    monkeypatch.setitem(sys.modules, backend, None)  # makes `import <backend>` raise ImportError
    with pytest.raises(ImportError, match=rf"{backend}.*pip install hybridflow\[tracking\]"):
        Tracker(tmp_path, backends=("jsonl", backend))
    assert not (tmp_path / METRICS_FILE).exists()  # checked before any backend starts


def _fake_module(name, calls):
    mod = types.ModuleType(name)

    def record(fn):
        return lambda *a, **k: calls.append((fn, a, k))

    if name == "wandb":
        run = types.SimpleNamespace(log=record("log"), finish=record("finish"))
        mod.init = lambda **k: calls.append(("init", (), k)) or run
    else:
        for fn in ("set_experiment", "start_run", "log_params", "log_metrics", "end_run"):
            setattr(mod, fn, record(fn))
    return mod


@pytest.mark.parametrize("backend", ["wandb", "mlflow"])
def test_optional_backends_receive_numeric_metrics(tmp_path, monkeypatch, backend):
    calls = []
    monkeypatch.setitem(sys.modules, backend, _fake_module(backend, calls))
    with Tracker(tmp_path, backends=(backend,), project="p", experiment="e",
                 config={"actor": {"lr": 1e-6}}) as tracker:
        tracker.log({"reward/mean": 0.5, "tag": "x", "bad": float("nan")}, step=3)
    names = [c[0] for c in calls]
    logged = [c for c in calls if c[0] in ("log", "log_metrics")]
    assert logged == [(logged[0][0], ({"reward/mean": 0.5},), {"step": 3})]
    if backend == "wandb":
        assert calls[0] == ("init", (), {"project": "p", "name": "e", "config": {"actor": {"lr": 1e-6}},
                                         "dir": str(tmp_path)})
        assert names[-1] == "finish"
    else:
        assert ("log_params", ({"actor.lr": "1e-06"},), {}) in calls and names[-1] == "end_run"


def test_omegaconf_config_dedup_and_close(tmp_path, monkeypatch):
    from omegaconf import OmegaConf
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_module("wandb", calls))
    tracker = Tracker(tmp_path, backends=["jsonl", "wandb", "jsonl"],
                      config=OmegaConf.create({"a": {"b": 1}, "c": "${a.b}"}))
    assert tracker.backends == ["jsonl", "wandb"]
    assert type(calls[0][2]["config"]) is dict and calls[0][2]["config"] == {"a": {"b": 1}, "c": 1}
    tracker.close()
    tracker.close()
    with pytest.raises(RuntimeError, match="closed"):
        tracker.log({"a": 1.0}, step=0)
