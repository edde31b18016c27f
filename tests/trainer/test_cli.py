"""The ``hybridflow`` command (trainer/main.py): lists, shows and runs the recipes, also from a
plain (non-editable) install where no checkout is on the path."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hybridflow.trainer.main import main, recipes, run

from hybridflow.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.stem for p in (REPO / "recipes").glob("*.py") if not p.name.startswith("_"))
# configs of a script's dataflow (their YAML starts from that script's YAML, no script of their own)
VARIANTS = {"rloo": "grpo", "reinforce_pp": "grpo", "dr_grpo": "grpo", "gspo": "grpo", "ctpo": "grpo",
            "ppo_rm": "ppo"}


def test_list_names_every_recipe_script_and_variant(capsys):
    assert list(recipes()) == sorted([*SCRIPTS, *VARIANTS]) and "grpo" in SCRIPTS
    main(["list"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == sorted([*SCRIPTS, *VARIANTS])
    assert any(line.startswith("grpo") and "Group Relative Policy Optimization" in line for line in lines)
    for name, script in VARIANTS.items():
        assert any(line.startswith(name) and f"(runs {script}.py)" in line for line in lines), name
    assert not any(line.startswith("base ") for line in lines)  # base.yaml is no recipe


class Started(Exception):
    """Raised instead of starting a run: carries the config the recipe parsed."""


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_variant_runs_its_script_with_its_yaml(variant, monkeypatch):
    """``hybridflow gspo k=v`` is ``hybridflow grpo --config recipes/gspo.yaml k=v`` (same config)."""
    from hybridflow.trainer.run import RLRun

    def started(self, cfg):
        raise Started(cfg)

    monkeypatch.setattr(RLRun, "__init__", started)
    seen = []
    for argv in ([variant, "trainer.steps=3"],
                 [VARIANTS[variant], "--config", str(REPO / "recipes" / f"{variant}.yaml"), "trainer.steps=3"]):
        with pytest.raises(Started) as info:
            run(argv)
        seen.append(info.value.args[0])
    assert seen[0] == seen[1] and seen[0].trainer.steps == 3
    assert seen[0] == load_config(str(REPO / "recipes" / f"{variant}.yaml"), ["trainer.steps=3"])
    with pytest.raises(ConfigError, match=f"already runs {VARIANTS[variant]}.py with --config {variant}.yaml"):
        run([variant, "--config", "mine.yaml"])


def test_config_prints_the_merged_default_config(capsys):
    main(["config", "grpo"])
    shown = yaml.safe_load(capsys.readouterr().out)
    from omegaconf import OmegaConf

    assert shown == OmegaConf.to_container(load_config(str(REPO / "recipes" / "grpo.yaml")))
    assert shown["algorithm"]["adv_estimator"] == "grpo" and "trainer" in shown  # base.yaml merged in


def test_unknown_recipe_and_bad_overrides_are_named(capsys):
    with pytest.raises(SystemExit, match="no recipe 'grop'.*grpo"):
        main(["grop"])
    with pytest.raises(SystemExit, match="'quickstart' has no config of its own"):
        main(["config", "quickstart"])
    with pytest.raises(ConfigError, match="no_such"):  # the arguments reach the recipe's own parser
        run(["grpo", "no_such.key=1"])
    capsys.readouterr()
    assert main(["grpo", "no_such.key=1"]) == 2  # the console script: one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("hybridflow: unknown config key 'no_such.key'") and "Traceback" not in err
    main([])
    assert "usage: hybridflow" in capsys.readouterr().out


def test_plain_install_carries_the_recipes_and_their_yaml(tmp_path):
    """``pip install .`` (not editable) into a folder: the recipes and YAMLs are package data, and
    the command works from a directory with no checkout on the path."""
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-compile", "--target", str(target), str(REPO)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert (target / "hybridflow" / "recipes" / "grpo.yaml").is_file()
    assert (target / "hybridflow" / "recipes" / "base.yaml").is_file()
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="1")
    code = ("import hybridflow, sys; from hybridflow.trainer.main import main; "
            "assert hybridflow.__file__.startswith(sys.argv[1]), hybridflow.__file__; main(['config', 'ppo'])")
    out = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert yaml.safe_load(out.stdout)["algorithm"]["adv_estimator"] == "gae"
