"""Reward model — Bradley–Terry on preference pairs (Christiano et al. 2017; Ouyang et al. 2022):
learn a score r(prompt, response) with P(chosen ≻ rejected) = σ(r_c − r_r).

    for each batch of pairs:   r_c, r_r ← RM(prompt + chosen), RM(prompt + rejected)   (head at the last token)
                               loss = mean −log σ(r_c − r_r − margin);  one optimizer step
    every k steps (and before the first, and at the end): pair accuracy on the held-out pairs
    at the end: export the RM as an HF checkpoint (run_dir/hf), usable as an RL recipe's reward.model_path

Run: ``python recipes/reward_model.py [--config FILE] key=value ...`` (defaults: recipes/reward_model.yaml).
"""
import os
import sys

from tqdm import tqdm
from transformers import AutoTokenizer

from hybridflow.config import parse_cli, require_choice
from hybridflow.trainer.algos import PREFERENCE_LOSSES, get_preference_loss
from hybridflow.trainer.build import build_workers
from hybridflow.trainer.data import PairDataset, PromptLoader
from hybridflow.trainer.metrics import reduce_metrics
from hybridflow.trainer.tracking import Tracker


def main(argv=None):
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, os.path.join(os.path.dirname(__file__), "reward_model.yaml"))
    require_choice(cfg, "rm.loss", PREFERENCE_LOSSES.names())
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    keys = dict(prompt_key=cfg.data.prompt_key, chosen_key=cfg.data.chosen_key, rejected_key=cfg.data.rejected_key,
                max_length=int(cfg.data.max_length))
    train = PairDataset(cfg.data.train, tokenizer, **keys)
    val = PairDataset(cfg.data.val, tokenizer, **keys) if cfg.data.get("val") else None
    loader = PromptLoader(train, int(cfg.data.batch_size), seed=int(cfg.seed), total_steps=int(cfg.trainer.steps))
    (rm,) = build_workers(cfg, "reward_model")
    tracker = Tracker(cfg.trainer.run_dir, backends=list(cfg.trainer.trackers), config=cfg)

    def validate():  # the preference loss and its metrics (pair accuracy, margin) on the held-out pairs
        scores = rm.compute_scores(val.collate(val.rows)).batch
        _, metrics = get_preference_loss(cfg.rm.loss)(scores["chosen_scores"], scores["rejected_scores"],
                                                      margin=float(cfg.rm.margin))
        return {f"val/{k}": float(v) for k, v in metrics.items()}

    steps, every = int(cfg.trainer.steps), int(cfg.trainer.val_every)
    if val is not None and every:
        tracker.log(validate(), 0)
    bar = tqdm(loader, total=steps, desc="reward model")
    for step, batch in enumerate(bar, start=1):
        metrics = reduce_metrics(rm.train_step(batch).meta_info["metrics"])
        if val is not None and every and (step % every == 0 or step == steps):
            metrics.update(validate())
        tracker.log(metrics, step)
        bar.set_postfix(loss=f"{metrics['rm/loss']:.3f}", acc=f"{metrics['rm/accuracy']:.2f}")
    rm.export_hf(os.path.join(cfg.trainer.run_dir, "hf"))
    tracker.close()
    rm.shutdown()  # stop the workers (Ray processes) and free their resources
    rm.pool.shutdown()
    return metrics


if __name__ == "__main__":
    main()
