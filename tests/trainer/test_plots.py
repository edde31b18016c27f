"""Curves: PNG files written from metrics.jsonl."""
import pytest

from hybridflow.trainer.plots import ema, plot_curves, plot_many
from hybridflow.trainer.tracking import Tracker

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(path, scale):
    with Tracker(path, backends=("jsonl",)) as tracker:
        for step in range(1, 21):
            tracker.log({"reward/mean": scale * step / 20, "response_length/mean": 10.0 + step,
                         "actor/kl_ref": float("nan") if step == 5 else 0.01}, step=step)
    return path


def _assert_png(path):
    import matplotlib.image
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_plot_curves(tmp_path):
    run = _run(tmp_path / "run", 1.0)
    out = plot_curves(run)
    assert out == run / "reward_curve.png"
    _assert_png(out)
    multi = plot_curves(run, keys=["reward/mean", "response_length/mean", "actor/kl_ref"],
                        out=tmp_path / "figs" / "all.png", smooth=0.0)
    assert multi == tmp_path / "figs" / "all.png"
    _assert_png(multi)


def test_plot_curves_errors(tmp_path):
    run = _run(tmp_path / "run", 1.0)
    with pytest.raises(ValueError, match="'critic/vf_loss'.*present.*reward/mean"):
        plot_curves(run, keys=("critic/vf_loss",))
    with pytest.raises(ValueError, match="smooth"):
        plot_curves(run, smooth=1.0)
    with pytest.raises(FileNotFoundError):
        plot_curves(tmp_path / "empty")


def test_plot_many(tmp_path):
    runs = {"grpo": _run(tmp_path / "a", 1.0), "ppo": _run(tmp_path / "b", 0.5)}
    out = plot_many(runs, "reward/mean", tmp_path / "zoo.png")
    _assert_png(out)
    with Tracker(tmp_path / "c", backends=("jsonl",)) as tracker:
        tracker.log({"critic/vf_loss": 1.0}, step=1)
    runs["broken"] = tmp_path / "c"
    with pytest.raises(ValueError, match="'broken'.*'reward/mean'.*critic/vf_loss"):
        plot_many(runs, "reward/mean", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_ema_debiased():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    # m1 = 0.5*1 -> 1.0; m2 = 0.5*0.5 + 0.5*3 = 1.75 -> /0.75
    assert ema([1.0, 3.0], 0.5) == pytest.approx([1.0, 1.75 / 0.75])
    assert ema([1.0, 5.0], 0.0) == [1.0, 5.0]
