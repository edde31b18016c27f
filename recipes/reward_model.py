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

from hybridflow.config import parse_cli
from hybridflow.trainer.algos import get_preference_loss
from hybridflow.trainer.data import PairDataset, PromptLoader
from hybridflow.trainer.metrics import reduce_metrics
from hybridflow.trainer.settings import reward_model_settings
from hybridflow.trainer.tracking import Tracker
from hybridflow.workers import build_workers


def main(argv=None):
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, os.path.join(os.path.dirname(__file__), "reward_model.yaml"))
    s = reward_model_settings(cfg)
    tokenizer = AutoTokenizer.from_pretrained(s.model.path)
    keys = dict(prompt_key=s.data.prompt_key, chosen_key=s.data.chosen_key, rejected_key=s.data.rejected_key,
                max_length=s.data.max_length)
    train = PairDataset(s.data.train, tokenizer, **keys)
    val = PairDataset(s.data.val, tokenizer, **keys) if s.data.val else None
    loader = PromptLoader(train, s.data.batch_size, seed=s.seed, total_steps=s.trainer.steps)
    (rm,) = build_workers(s, "reward_model")
    tracker = Tracker(s.trainer.run_dir, backends=s.trainer.trackers, config=cfg)

    def validate():  # the preference loss and its metrics (pair accuracy, margin) on the held-out pairs
        scores = rm.compute_scores(val.collate(val.rows)).batch
        _, metrics = get_preference_loss(s.rm.loss)(scores["chosen_scores"], scores["rejected_scores"],
                                                    margin=s.rm.margin)
        return {f"val/{k}": float(v) for k, v in metrics.items()}

    steps, every = s.trainer.steps, s.trainer.val_every
    if val is not None and every:
        tracker.log(validate(), 0)
    bar = tqdm(loader, total=steps, desc="reward model")
    for step, batch in enumerate(bar, start=1):
        metrics = reduce_metrics(rm.train_step(batch).meta_info["metrics"])
        if val is not None and every and (step % every == 0 or step == steps):
            metrics.update(validate())
        tracker.log(metrics, step)
        bar.set_postfix(loss=f"{metrics['rm/loss']:.3f}", acc=f"{metrics['rm/accuracy']:.2f}")
    rm.export_hf(os.path.join(s.trainer.run_dir, "hf"))
    tracker.close()
    rm.shutdown()  # stop the workers (Ray processes) and free their resources
    rm.pool.shutdown()
    return metrics


if __name__ == "__main__":
    main()
