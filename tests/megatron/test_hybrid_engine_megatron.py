"""3D-HybridEngine on real megatron-core models: 4 gloo ranks, a MegatronEngine in (pp, tp).

For every generation TP size tg the resharded generation shard equals the slice of the full model
(the HF checkpoint before training, the engine's own full gather after), the naive baseline gives
the same, greedy generation by a megatron GPTModel built on the generation TP groups (and, for
tg = 1, by an HF model on the gathered weights) equals an HF model on the full weights, the
training tensors come back bit-exact, and after one optimizer step resharding sees the update.
"""
import os

import pytest
import torch
from transformers import AutoConfig

from _reshard_util import launch, tiny_qwen2

pytestmark = pytest.mark.megatron
UTIL = os.path.join(os.path.dirname(__file__), "_reshard_util.py")


LAYOUTS = [(2, 2, "1,2", True), (1, 4, "1,2,4", False)]   # (pp, tp, generation tgs, tied embeddings)


@pytest.fixture(scope="module")
def megatron_results(tmp_path_factory):
    """Both training layouts in one launch of 4 ranks (one process start-up): per layout, the
    results of every rank."""
    work = tmp_path_factory.mktemp("hybrid_engine")
    specs = []
    for pp, tp, tgs, tied in LAYOUTS:
        ckpt = str(work / f"ckpt_pp{pp}tp{tp}")
        tiny_qwen2(ckpt, tied=tied)
        assert AutoConfig.from_pretrained(ckpt).tie_word_embeddings == tied
        specs.append(f"{ckpt}:{pp}:{tp}:{tgs}")
    launch(UTIL, 4, ["megatron", str(work), *specs], timeout=1200)
    return {(pp, tp): [torch.load(work / f"mg_pp{pp}tp{tp}_rank{r}.pt", weights_only=False) for r in range(4)]
            for pp, tp, _, _ in LAYOUTS}


@pytest.mark.parametrize("pp,tp,tgs,tied", LAYOUTS)
def test_reshard_megatron(megatron_results, pp, tp, tgs, tied):
    results = megatron_results[(pp, tp)]
    for rank, res in enumerate(results):
        assert res.pop("wrapper_match") and res.pop("wrapper_restored"), f"rank {rank}: MegatronReshard"
        assert sorted(res) == sorted((int(tg), step) for tg in tgs.split(",") for step in range(2))
        for (tg, step), r in res.items():
            where = f"rank {rank} tg={tg} step={step}"
            assert r["match"], f"{where}: generation shard != slice of the full model"
            assert r["naive_match"], f"{where}: naive baseline shard != slice of the full model"
            assert r["restored"], f"{where}: training tensors not restored after generation"
            assert torch.equal(r["tokens"], r["ref_tokens"]), f"{where}: greedy tokens differ from the full model's"
            if tg == 1:  # HF names straight from the generation shard; an HF model on them generates the same
                assert r["hf_names"], f"{where}: hf_weights != convert.megatron_to_hf"
                assert torch.equal(r["hf_tokens"], r["ref_tokens"]), where
            if step == 0:
                assert r["changed"], f"{where}: the optimizer step changed nothing"
            s = r["stats"]
            assert s["peak_extra_bytes"] <= s["gen_bytes"] - s["train_bytes"] + s["bucket_bytes"], (where, s)
            assert s["peak_extra_bytes"] < r["naive_stats"]["peak_extra_bytes"] or tg == 1 and pp * tp == 1, where
    # every rank of every generation layout generated the same continuation from the same weights
    for key in results[0]:
        assert all(torch.equal(res[key]["tokens"], results[0][key]["tokens"]) for res in results), key
