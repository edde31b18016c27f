"""User code named in the config reaches the workers by import path: a policy loss in the user's own
file (``actor.policy_loss: path/to/file.py:fn``) is resolved in each worker process, on 2 Ray
ranks too, with its own options; a script that would start a run when a worker imports it refuses."""
from __future__ import annotations

import os
import textwrap

import pytest

from .conftest import run_recipe, train_rows

LOSS_PY = '''
"""A user's policy loss: PPO's, scaled, reporting where it ran."""
import os

import torch

from hybridflow.trainer.algos import get_policy_loss


def scaled_ppo(old_log_prob, log_prob, advantages, response_mask, *, scale=1.0, **cfg):
    loss, metrics = get_policy_loss("ppo")(old_log_prob, log_prob, advantages, response_mask, **cfg)
    metrics["actor/user_loss_scale"] = torch.tensor(float(scale))
    metrics["actor/user_loss_pid"] = torch.tensor(float(os.getpid()))
    return loss * scale, metrics
'''
FAST = ("trainer.steps=1", "trainer.val_every=0", "trainer.val_before_train=false", "trainer.plot=false")


@pytest.fixture
def loss_file(tmp_path):
    path = tmp_path / "my_loss.py"
    path.write_text(textwrap.dedent(LOSS_PY))
    return path


@pytest.mark.ray
def test_a_loss_named_by_path_runs_on_two_ray_ranks(assets, tmp_path, loss_file, ray_e2e, runs):
    run = run_recipe("grpo", assets.args(tmp_path / "run", "executor=ray", "world_size=2", "num_cpus_per_worker=0.5",
                                         assets.reward("parity"), f"actor.policy_loss={loss_file}:scaled_ppo",
                                         "+actor.policy_loss_args.scale=0.5", *FAST))
    (row,) = train_rows(tmp_path / "run").values()
    assert row["actor/user_loss_scale"] == 0.5  # the user's function ran, with its option
    pids = run.groups["actor"]._handle.pids()
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert row["actor/user_loss_pid"] != os.getpid()  # (the mean of the two workers' pids)
    assert min(pids) <= row["actor/user_loss_pid"] <= max(pids)


def test_a_loss_named_by_path_runs_inprocess_and_a_typo_in_its_name_is_named(assets, tmp_path, loss_file):
    from hybridflow.config import ConfigError

    run_recipe("grpo", assets.args(tmp_path / "run", assets.reward("parity"),
                                   f"actor.policy_loss={loss_file}:scaled_ppo", *FAST))
    (row,) = train_rows(tmp_path / "run").values()
    assert row["actor/user_loss_scale"] == 1.0 and row["actor/user_loss_pid"] == os.getpid()
    with pytest.raises(ConfigError, match=r"actor.policy_loss.*defines no 'scaled_pop'.*scaled_ppo"):
        run_recipe("grpo", assets.args(tmp_path / "bad", f"actor.policy_loss={loss_file}:scaled_pop", *FAST))


def test_a_run_started_inside_a_worker_process_refuses(assets, tmp_path, monkeypatch):
    """A worker imports a script named in the config; one that starts its run at import is stopped."""
    from hybridflow.worker import WORKER_PROCESS_ENV

    monkeypatch.setenv(WORKER_PROCESS_ENV, "1")
    with pytest.raises(RuntimeError, match=r"if __name__ == \"__main__\""):
        run_recipe("grpo", assets.args(tmp_path, *FAST))
