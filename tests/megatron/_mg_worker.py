"""One rank of the multi-process megatron tests (torchrun-style env, gloo, CPU).

argv: work dir, then layouts ``name:tp:pp:ckpt_dir:distributed_optimizer:overlap_grad_reduce``.
For each layout the megatron engine is built on the checkpoint (micro-batches packed by a token
budget: rows and lengths vary between micro-batches, also through the pipeline); results go to
``<work>/<name>_rank<r>.pt`` (layouts named ``value*`` build a value model and record only its
loss trace):
``roundtrip`` (gathered HF state dict == checkpoint tensors, bit for bit), ``logits_gap``
(vocab-gathered megatron logits vs transformers, pp == 1 only), ``trace`` (global loss over
training steps on this rank's DP shard), ``dispatch`` and the final HF state dict.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _mg_common import LR, VALUE_LR, rl_batch, train_trace, value_trace  # noqa: E402


def logits_gap(engine, ckpt):
    """max |megatron logits (TP shards all-gathered) - transformers logits| on unpadded ids."""
    from megatron.core import parallel_state as ps
    from transformers import AutoModelForCausalLM

    ids = torch.randint(2, 258, (2, 9), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(9)[None].expand(2, -1)
    with torch.no_grad():
        local = engine.megatron_module(ids, pos, None)
        parts = [torch.empty_like(local) for _ in range(engine.tp_size)]
        dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
        ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)(input_ids=ids).logits
    return float((torch.cat(parts, -1) - ref).abs().max())


def main(work, *layouts):
    from megatron.core import parallel_state as ps

    from hybridflow.worker import init_distributed
    from hybridflow.workers.convert import load_hf_state_dict
    from hybridflow.workers.engines.megatron import MegatronEngine

    init_distributed()
    rank = dist.get_rank()
    batch = rl_batch()
    for spec in layouts:
        name, tp, pp, ckpt, distopt, overlap = spec.split(":")
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        value = name.startswith("value")
        engine = MegatronEngine(model_path=ckpt, tp=int(tp), pp=int(pp), lr=VALUE_LR if value else LR,
                                weight_decay=0.0, grad_clip=1.0, micro_batch_size=2, max_tokens_per_micro_batch=16,
                                use_distributed_optimizer=bool(int(distopt)),
                                overlap_grad_reduce=bool(int(overlap)),
                                model_type="value" if value else "causal_lm")
        res = {"dispatch": engine.dispatch_info}
        dp_rank, dp_size, _ = engine.dispatch_info
        shard = batch[torch.arange(len(batch)).chunk(dp_size)[dp_rank]]
        if value:  # a critic: the value loss trace only
            res["trace"] = value_trace(engine, batch, shard)
            torch.save(res, os.path.join(work, f"{name}_rank{rank}.pt"))
            continue
        original = load_hf_state_dict(ckpt)
        gathered = engine.generation_state_dict()
        res["roundtrip"] = (sorted(gathered) == sorted(original)
                            and all(torch.equal(gathered[k], original[k]) for k in original))
        if int(pp) == 1:
            res["logits_gap"] = logits_gap(engine, ckpt)
        res["trace"] = train_trace(engine, batch, shard)
        res["final"] = engine.generation_state_dict()
        # the actor's rollout weights through the 3D-HybridEngine (micro-DP) equal the naive gather,
        # and the training shards are back afterwards
        with engine.generation_context() as module:
            res["micro_dp_equals_naive"] = all(torch.equal(p, res["final"][n]) for n, p in module.named_parameters())
        after = engine.generation_state_dict()
        res["restored"] = all(torch.equal(after[k], res["final"][k]) for k in after)
        engine.export_hf(os.path.join(work, f"hf_{name}"))
        torch.save(res, os.path.join(work, f"{name}_rank{rank}.pt"))
        dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
