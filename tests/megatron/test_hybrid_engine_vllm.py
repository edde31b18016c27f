"""The vLLM path at tg = 1: a (pp=2, tp=2) MegatronEngine takes one optimizer step, the micro-DP
reshard gives every rank the full model, and its HF-named tensors (``hf_weights``) loaded into a
vLLM engine through ``VLLMRollout.load_weights`` (vLLM's ``reload_weights``) generate the same
greedy tokens as an HF model on the engine's own full gather of the updated weights.

The megatron ranks run in subprocesses; vLLM runs in the test's process (a process with no
torch.distributed world), fed the tensors rank 0 saved."""
import os

import pytest
import torch
from _reshard_util import NEW_TOKENS, PROMPTS, launch, tiny_qwen2
from tensordict import TensorDict

pytestmark = [pytest.mark.vllm, pytest.mark.megatron]
UTIL = os.path.join(os.path.dirname(__file__), "_reshard_util.py")


def test_vllm_generates_from_micro_dp_shard(tmp_path):
    from transformers import AutoConfig, Qwen2ForCausalLM

    from hybridflow.workers.rollout.vllm import VLLMRollout

    ckpt = str(tmp_path / "ckpt")
    # head size 32 (vLLM's CPU kernels); tied embeddings: hf_weights must also emit lm_head.weight
    tiny_qwen2(ckpt, tied=True, hidden=128, heads=4, kv_heads=2)
    launch(UTIL, 4, ["vllm", ckpt, str(tmp_path)], timeout=900)
    weights = torch.load(tmp_path / "hf_tg1.pt", weights_only=False)
    ref_state = torch.load(tmp_path / "hf_ref.pt", weights_only=False)

    prompts = torch.tensor(PROMPTS)
    ref = Qwen2ForCausalLM(AutoConfig.from_pretrained(ckpt)).eval()
    ref.load_state_dict(ref_state, strict=False)
    want = ref.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False, attention_mask=torch.ones_like(prompts),
                        pad_token_id=0, eos_token_id=None)[:, prompts.shape[1]:]

    rollout = VLLMRollout(ckpt, max_model_len=32, seed=0, cache_root=str(tmp_path / "vllm_cache"))
    batch = TensorDict({"input_ids": prompts, "attention_mask": torch.ones_like(prompts),
                        "position_ids": torch.arange(prompts.shape[1]).expand_as(prompts)}, batch_size=[2])
    kwargs = dict(do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=1, pad_token_id=0, ignore_eos=True)
    before = rollout.generate(batch, **kwargs)["responses"]
    rollout.load_weights(iter(weights.items()))
    after = rollout.generate(batch, **kwargs)["responses"]
    assert torch.equal(after, want)
    assert not torch.equal(before, want)   # the checkpoint's weights alone would not give these tokens
