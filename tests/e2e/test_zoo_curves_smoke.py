"""Smoke test of benchmarks/zoo_curves.py: two recipes, two steps each, from the quick start's
warmed model; the figure and the JSON of the curves are written (no timing assertions)."""
import json

from benchmarks.zoo_curves import ZOO, main


def test_zoo_curves_two_recipes(warmed, tmp_path, runs):
    out = tmp_path / "figures"
    report = main(["--steps", "2", "--only", "grpo,dapo", "--out", str(out), "--runs", str(tmp_path / "runs"),
                   *warmed, "data.batch_size=8"])
    assert json.loads((out / "zoo_rewards.json").read_text()) == json.loads(json.dumps(report))
    assert report["steps"] == 2 and list(report["recipes"]) == ["grpo", "dapo"]
    for label, curve in report["recipes"].items():
        assert curve["metric"] == ZOO[label][2] and curve["step"] == [1, 2]
        assert all(0.0 <= v <= 1.0 for v in curve["value"]) and curve["wall_s"] > 0
    assert report["recipes"]["dapo"]["metric"] == "dapo/gen_score/mean"
    assert (out / "zoo_rewards.png").stat().st_size > 10_000
    assert len(runs) == 2  # both runs went through RLRun (and are closed by the fixture)


def test_zoo_lists_every_rl_recipe():
    """Every RL recipe script (one with an RLRun loop) is in the zoo, so the figure stays complete."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    rl = {p.stem for p in (root / "recipes").glob("*.py") if "RLRun(" in p.read_text()}
    listed = {Path(entry[0]).stem for entry in ZOO.values()}
    assert rl <= listed, f"recipes missing from benchmarks/zoo_curves.py ZOO: {sorted(rl - listed)}"
    from hybridflow.trainer.main import recipes

    variants = {name for name, line in recipes().items() if line.startswith("(runs grpo.py)")}
    assert len(variants) >= 5 and variants <= set(ZOO), f"variants missing from ZOO: {sorted(variants - set(ZOO))}"
