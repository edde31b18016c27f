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
from hybridflow.trainer.build import build_workers
from hybridflow.trainer.data import PromptLoader, SFTDataset
from hybridflow.trainer.metrics import reduce_metrics
from hybridflow.trainer.tracking import Tracker
from hybridflow.workers.roles.sft import SFTWorker


def main(argv=None):
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, os.path.join(os.path.dirname(__file__), "sft.yaml"))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    data = SFTDataset(cfg.data.train, tokenizer, prompt_key=cfg.data.prompt_key,
                      response_key=cfg.data.response_key, max_length=int(cfg.data.max_length))
    loader = PromptLoader(data, int(cfg.data.batch_size), seed=int(cfg.seed), total_steps=int(cfg.trainer.steps))
    (trainer,) = build_workers(cfg, "sft", classes={"sft": SFTWorker})
    tracker = Tracker(cfg.trainer.run_dir, backends=list(cfg.trainer.trackers), config=cfg)

    bar = tqdm(loader, total=int(cfg.trainer.steps), desc="sft")
    for step, batch in enumerate(bar, start=1):
        metrics = reduce_metrics(trainer.train_step(batch).meta_info["metrics"])
        tracker.log(metrics, step)
        bar.set_postfix(loss=f"{metrics['sft/loss']:.3f}")
        if cfg.trainer.export_every and step % int(cfg.trainer.export_every) == 0:
            trainer.export_hf(os.path.join(cfg.trainer.run_dir, f"hf_step_{step}"))
    trainer.export_hf(os.path.join(cfg.trainer.run_dir, "hf"))
    tracker.close()
    return metrics


if __name__ == "__main__":
    main()
