"""SFT — supervised fine-tuning: maximise log p(response | prompt) on (prompt, response) pairs.

    for each batch of pairs:  loss = −mean over response tokens of log p(token | prefix)
    at the end:               export the model as an HF checkpoint (run_dir/hf)

Run: ``python recipes/sft.py [--config FILE] key=value ...`` (defaults: recipes/sft.yaml).
"""
import os
import sys

from tqdm import tqdm
from transformers import AutoTokenizer

from hybridflow.config import parse_cli
from hybridflow.trainer.data import PromptLoader, SFTDataset
from hybridflow.trainer.metrics import reduce_metrics
from hybridflow.trainer.settings import sft_settings
from hybridflow.trainer.tracking import Tracker
from hybridflow.workers import build_workers


def main(argv=None):
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, os.path.join(os.path.dirname(__file__), "sft.yaml"))
    s = sft_settings(cfg)
    tokenizer = AutoTokenizer.from_pretrained(s.model.path)
    data = SFTDataset(s.data.train, tokenizer, prompt_key=s.data.prompt_key, response_key=s.data.response_key,
                      max_length=s.data.max_length)
    loader = PromptLoader(data, s.data.batch_size, seed=s.seed, total_steps=s.trainer.steps)
    (trainer,) = build_workers(s, "sft")
    tracker = Tracker(s.trainer.run_dir, backends=s.trainer.trackers, config=cfg)

    bar = tqdm(loader, total=s.trainer.steps, desc="sft")
    for step, batch in enumerate(bar, start=1):
        metrics = reduce_metrics(trainer.train_step(batch).meta_info["metrics"])
        tracker.log(metrics, step)
        bar.set_postfix(loss=f"{metrics['sft/loss']:.3f}")
        if s.trainer.export_every and step % s.trainer.export_every == 0:
            trainer.export_hf(os.path.join(s.trainer.run_dir, f"hf_step_{step}"))
    trainer.export_hf(os.path.join(s.trainer.run_dir, "hf"))
    tracker.close()
    return metrics


if __name__ == "__main__":
    main()
