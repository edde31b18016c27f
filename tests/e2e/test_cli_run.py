"""``hybridflow RECIPE key=value ...`` (the console script pip installs) trains like
``python recipes/RECIPE.py`` does, from any working directory."""
import json
import os
import shutil
import subprocess
import sys


def test_console_script_runs_grpo(assets, tmp_path):
    script = shutil.which("hybridflow", path=os.path.dirname(sys.executable))
    assert script, "no `hybridflow` next to this Python: `pip install -e .` installs the console script"
    run_dir = tmp_path / "run"
    args = assets.args(run_dir, "trainer.steps=2", "trainer.val_every=0", "trainer.val_before_train=false")
    out = subprocess.run([script, "grpo", *args], cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = [r["step"] for r in rows if "reward/mean" in r]
    assert steps == [1, 2] and all("timing/update_actor_s" in r for r in rows if "reward/mean" in r)
