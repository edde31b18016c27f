"""Reward-model training (recipes/reward_model.py) on the quick start's task, the exported model in
the RL reward worker, and PPO whose only reward is that model (recipes/ppo_rm.yaml).

The pairs come from ``make_reverse_pairs`` (chosen = the reversal, rejected = a near miss); the RM
starts from the quick start's half-trained SFT model (fixture ``warmed``). Bars are about the
smallest values measured over seeds 0-2 minus a margin; the measurements are next to each bar."""
import os
import runpy

import pytest
import torch

from .conftest import read_rows, run_recipe

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")
RAY = ["executor=ray", "world_size=2", "num_cpus_per_worker=0.5"]
RM_STEPS = 2000  # recipes/reward_model.yaml's budget: PPO games a weaker RM (docs/recipes.md; seed 1 at 1000 steps)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from hybridflow.trainer.tasks import make_reverse_pairs

    return make_reverse_pairs(tmp_path_factory.mktemp("pairs"), n_train=8000, n_val=256)


def rm_args(warmed, pairs, run_dir, *extra):
    model = next(a for a in warmed if a.startswith("model.path="))
    return [model, f"data.train={pairs['train']}", f"data.val={pairs['val']}", f"trainer.run_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def reward_model(warmed, pairs, tmp_path_factory):
    """The RM trained with the recipe's defaults (inprocess): its run dir."""
    run_dir = tmp_path_factory.mktemp("rm")
    run_recipe("reward_model", rm_args(warmed, pairs, run_dir, f"trainer.steps={RM_STEPS}"))
    return run_dir


def val_accuracy(run_dir):
    return {r["step"]: r["val/rm/accuracy"] for r in read_rows(run_dir) if "val/rm/accuracy" in r}


def test_reward_model_learns_the_rule(reward_model):
    # val pair accuracy after 2000 steps, seeds 0 / 1 / 2: 0.996 / 0.988 / 1.0; at step 0 ≈ 0.5
    acc = val_accuracy(reward_model)
    rows = [r for r in read_rows(reward_model) if "rm/loss" in r]
    print(f"reward model (inprocess, {RM_STEPS} steps): val pair accuracy {acc}")
    assert [r["step"] for r in rows] == list(range(1, RM_STEPS + 1))
    assert 0.35 <= acc[0] <= 0.65 and acc[RM_STEPS] >= 0.95
    assert os.path.isfile(os.path.join(reward_model, "hf", "config.json"))


@pytest.mark.ray
def test_reward_model_learns_on_ray(warmed, pairs, tmp_path, ray_e2e):
    # 2 ranks, 32 pairs each (the same global batch); val accuracy after 150 steps: 0.848 (seed 0; the
    # same run inprocess: 0.81 at 100 steps, 0.84 at 200)
    run_recipe("reward_model", rm_args(warmed, pairs, tmp_path, *RAY, "trainer.steps=150"))
    acc = val_accuracy(tmp_path)
    print(f"reward model (ray, 2 ranks, 150 steps): val pair accuracy {acc}")
    assert sorted(r["step"] for r in read_rows(tmp_path) if "rm/loss" in r) == list(range(1, 151))
    assert acc[150] >= 0.75 and os.path.isfile(os.path.join(tmp_path, "hf", "config.json"))


@pytest.mark.lora
def test_a_lora_reward_model_learns_and_exports_a_plain_model(warmed, pairs, tmp_path):
    # rank-8 adapters + the full score head, the recipe's lr; val accuracy after 200 steps, seeds
    # 0 / 1 / 2: 0.812 / 0.777 / 0.828 (from 0.51-0.56); full fine-tuning: 0.84 (seed 0)
    from transformers import AutoModelForTokenClassification

    run_recipe("reward_model", rm_args(warmed, pairs, tmp_path, "optim.lora.rank=8", "trainer.steps=200",
                                       "trainer.val_every=100"))
    acc = val_accuracy(tmp_path)
    print(f"LoRA reward model (inprocess, 200 steps): val pair accuracy {acc}")
    assert acc[0] <= 0.65 and acc[200] >= 0.70
    merged = AutoModelForTokenClassification.from_pretrained(os.path.join(tmp_path, "hf"))
    assert merged.config.num_labels == 1 and not any("lora" in k for k in merged.state_dict())
    assert os.path.isfile(os.path.join(tmp_path, "hf", "adapter", "adapter_config.json"))


def rollout_batch(tokenizer, prompts, responses):
    """A batch shaped like the rollout's output: left-padded prompts, right-padded responses + EOS."""
    from hybridflow import DataProto
    from hybridflow.trainer.data import collate_prompts

    prompt_part = collate_prompts([{"prompt_ids": tokenizer(p)["input_ids"], "raw_prompt": p} for p in prompts],
                                  tokenizer)
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in responses]
    width = max(map(len, ids))
    resp = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    attn = torch.cat([prompt_part.batch["attention_mask"], mask], 1)
    return DataProto.from_dict({"prompts": prompt_part.batch["input_ids"], "responses": resp, "response_mask": mask,
                                "input_ids": torch.cat([prompt_part.batch["input_ids"], resp], 1),
                                "attention_mask": attn, "position_ids": (attn.cumsum(-1) - 1).clamp(min=0)},
                               {"raw_prompt": prompts, "ground_truth": [None] * len(prompts)})


def test_exported_model_scores_in_the_reward_worker(reward_model, warmed, pairs):
    """RewardWorker (reward.function: null, reward.model_path: the export) scores a rollout-shaped
    batch exactly as the trainer scored the pair (head at the last token, EOS included), and
    ranks the held-out chosen answers above the rejected ones."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from hybridflow.config import parse_cli
    from hybridflow.trainer.settings import rl_settings
    from hybridflow.workers import build_workers
    from hybridflow.trainer.data import PairDataset
    from hybridflow.workers.roles.reward_model import interleave_pairs, last_token_scores

    hf = str(reward_model / "hf")
    cfg = parse_cli(["--config", os.path.join(RECIPES, "ppo_rm.yaml"), *warmed, f"reward.model_path={hf}"],
                    os.path.join(RECIPES, "ppo.yaml"))
    (reward,) = build_workers(rl_settings(cfg), "reward")
    rows = pq.read_table(pairs["val"]).to_pylist()
    tokenizer = AutoTokenizer.from_pretrained(hf)
    scores = {}
    for side in ("chosen", "rejected"):
        out = reward.compute_rewards(rollout_batch(tokenizer, [r["prompt"] for r in rows], [r[side] for r in rows]))
        assert set(out.meta_info["metrics"]) == {"reward/model_score/mean"}  # no reward function ran
        scores[side] = out.batch["token_level_scores"].sum(-1)
    reward.shutdown()
    reward.pool.shutdown()
    accuracy = float((scores["chosen"] > scores["rejected"]).float().mean())
    assert accuracy >= 0.9, accuracy

    # the trainer's view of the same pairs: right-padded prompt + response + EOS, plain transformers
    data = PairDataset(pairs["val"], tokenizer, max_length=16)
    seqs = interleave_pairs(data.collate(data.rows).batch, tokenizer.pad_token_id)
    model = AutoModelForTokenClassification.from_pretrained(hf)
    with torch.no_grad():
        values = model(input_ids=seqs["input_ids"], attention_mask=seqs["attention_mask"],
                       position_ids=seqs["position_ids"]).logits.squeeze(-1)
    plain = last_token_scores(values, seqs["attention_mask"])
    torch.testing.assert_close(scores["chosen"], plain[0::2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores["rejected"], plain[1::2], atol=1e-4, rtol=1e-4)


def test_ppo_with_the_learned_reward_model_raises_exact_match(reward_model, warmed, tmp_path, runs):
    """PPO sees only the RM's score; the true task reward (greedy exact match on the validation
    prompts, measured before and after) must rise. Measured (30 steps, RM and PPO with the same
    seed): 0.516 → 0.652 / 0.602 / 0.664 for seeds 0 / 1 / 2; with seed 1's 1000-step RM (val
    accuracy 0.93) it fell to 0.352: PPO gamed it."""
    greedy_accuracy = runpy.run_path(os.path.join(RECIPES, "quickstart.py"))["greedy_accuracy"]
    val = next(a for a in warmed if a.startswith("data.val=")).split("=", 1)[1]
    model = next(a for a in warmed if a.startswith("model.path=")).split("=", 1)[1]
    run = run_recipe("ppo", ["--config", os.path.join(RECIPES, "ppo_rm.yaml"), *warmed,
                             f"reward.model_path={reward_model / 'hf'}", f"trainer.run_dir={tmp_path}",
                             "trainer.steps=30", "trainer.val_every=0", "trainer.val_before_train=false",
                             "trainer.export_hf=true", "trainer.plot=false"])
    rows = [r for r in read_rows(tmp_path) if "reward/mean" in r]
    assert run.step == 30 and len(rows) == 30
    assert all("reward/model_score/mean" in r and "reward/num_failed" not in r for r in rows)  # RM only
    before, after = greedy_accuracy(model, val), greedy_accuracy(str(tmp_path / "hf"), val)
    print(f"PPO with the learned RM: greedy exact match {before:.3f} → {after:.3f}")
    assert after - before >= 0.04, f"exact match {before:.3f} → {after:.3f}"


def test_config_errors_name_their_key(warmed, pairs, tmp_path, no_workers):
    from hybridflow.config import ConfigError

    with pytest.raises(ConfigError, match="rm.loss"):
        run_recipe("reward_model", rm_args(warmed, pairs, tmp_path, "rm.loss=bradley_terri"))
    with pytest.raises(ConfigError, match="reward.model_path"):
        run_recipe("ppo", ["--config", os.path.join(RECIPES, "ppo_rm.yaml"), *warmed,
                           f"reward.model_path={tmp_path / 'missing'}", f"trainer.run_dir={tmp_path}"])


def test_token_packing_is_refused(warmed, pairs, tmp_path):
    """Packing micro-batches by tokens would split pairs: the worker refuses it, naming the key."""
    with pytest.raises(Exception, match="optim.max_tokens_per_micro_batch"):
        run_recipe("reward_model", rm_args(warmed, pairs, tmp_path, "+optim.max_tokens_per_micro_batch=64"))


def test_pairs_and_their_batches(pairs, tmp_path):
    """The pair files hold right/wrong answers of every kind; a batch keeps each pair together."""
    import pyarrow.parquet as pq

    from hybridflow.trainer.data import DataError, PairDataset
    from hybridflow.trainer.tasks.reverse import PAIR_KINDS
    from hybridflow.trainer.tiny_model import build_tokenizer
    from hybridflow.workers.roles.reward_model import interleave_pairs, last_token_scores

    rows = pq.read_table(pairs["train"]).to_pylist()
    assert all(r["chosen"] == r["prompt"][:-1][::-1] != r["rejected"] for r in rows)
    assert {r["kind"] for r in rows} == set(PAIR_KINDS)
    assert not {r["prompt"] for r in rows} & {r["prompt"] for r in pq.read_table(pairs["val"]).to_pylist()}

    tokenizer = build_tokenizer()
    data = PairDataset(pairs["val"], tokenizer, max_length=12)  # "12345=" + "54321" + EOS = 12; longer dropped
    assert data.num_filtered == sum(len(r["rejected"]) > 5 for r in pq.read_table(pairs["val"]).to_pylist()) > 0
    batch = interleave_pairs(data.collate(data.rows[:3]).batch, tokenizer.pad_token_id)
    assert batch["pair"].tolist() == [0, 0, 1, 1, 2, 2] and batch["is_chosen"].tolist() == [1, 0] * 3
    assert tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()]) == \
        data.rows[0]["raw_prompt"] + tokenizer.decode(data.rows[0]["chosen_ids"])
    values = torch.arange(batch["input_ids"].numel(), dtype=torch.float32).view_as(batch["input_ids"])
    last = batch["attention_mask"].sum(-1) - 1
    assert torch.equal(last_token_scores(values, batch["attention_mask"]), values[torch.arange(6), last])

    same = tmp_path / "same.jsonl"
    same.write_text('{"prompt": "12=", "chosen": "21", "rejected": "21"}\n')
    with pytest.raises(DataError, match="same response"):
        PairDataset(same, tokenizer)
