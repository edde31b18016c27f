"""One rank of the 2-process FSDP2 test (run by test_fsdp_distributed.py, torchrun-style env).

argv: tiny checkpoint dir, work dir (holds batch.pt, prompts.pt; results go to rank<r>.pt), and
optionally a JSON object of extra engine options (the LoRA test's ``lora_rank``...).
"""
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from hybridflow.workers.engines.fsdp import FSDPEngine
from hybridflow.workers.rollout.hf import HFRollout

SHARDS = ([0, 1, 2], [3])  # unequal rows and tokens: global token normalisation + dummy micro-batches


def nll(mb, outputs):
    mask = mb["response_mask"]
    loss = -(outputs["log_probs"] * mask).sum() / mask.sum()
    return loss, {"loss": loss.detach()}


def full_params(engine):  # collective: every rank calls
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in engine.module.state_dict().items()}


def main(ckpt, work, extra="{}"):
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    rank = dist.get_rank()
    batch = torch.load(os.path.join(work, "batch.pt"), weights_only=False)
    prompts = torch.load(os.path.join(work, "prompts.pt"), weights_only=False)
    shard = batch[torch.tensor(SHARDS[rank])]
    engine = FSDPEngine({"model_path": ckpt, "lr": 1.0, "eps": 1.0, "weight_decay": 0.0, "grad_clip": None,
                         "max_tokens_per_micro_batch": 11, **json.loads(extra)})
    res = {"world": engine.world_size, "forward": engine.forward(shard, temperature=0.7)["log_probs"]}
    res["metrics"] = engine.train_batch(shard, nll)
    res["params"] = full_params(engine)

    # rollout on the sharded module; rank 1 stops after one token (its own eos), rank 0 runs on
    rollout = HFRollout(engine.module, engine.tokenizer, engine.device)
    mine = prompts[rank:rank + 1]
    greedy = rollout.generate(mine, do_sample=False, max_new_tokens=6)
    eos = int(greedy["responses"][0, 0]) if rank == 1 else engine.tokenizer.eos_token_id
    early = rollout.generate(mine, do_sample=False, max_new_tokens=6, eos_token_id=eos)
    res["early_mask"] = early["response_mask"]
    sampled = rollout.generate(mine, n=2, temperature=0.7, max_new_tokens=6, seed=rank)
    res["rollout_gap"] = float((engine.forward(sampled, temperature=0.7)["log_probs"]
                                - sampled["rollout_log_probs"]).abs().max())

    # DCP round trip over 2 ranks, then export
    engine.save_checkpoint(os.path.join(work, "dcp"))
    engine.train_batch(shard, nll)
    after = full_params(engine)
    engine.load_checkpoint(os.path.join(work, "dcp"))
    engine.train_batch(shard, nll)
    again = full_params(engine)
    res["dcp_gap"] = max(float((after[k] - again[k]).abs().max()) for k in after)
    engine.export_hf(os.path.join(work, "hf"))
    res["final_params"] = again
    res["hf_weights"] = dict(engine.iter_hf_weights())  # collective; with LoRA the merged weights
    torch.save(res, os.path.join(work, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
