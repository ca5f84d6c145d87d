"""Greedy generation through the full engine equals HF ``generate`` token for token.

Requests of different lengths arrive at different steps, prompts are split into chunks that run
beside decodes, and the KV cache is small enough that requests get preempted and recomputed.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from jaxserve.sampling_params import SamplingParams
from tests.engine.engine_helpers import make_engine

pytestmark = pytest.mark.hf_reference


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    import torch

    model.generation_config.eos_token_id = None  # like ignore_eos: EOS is an ordinary token here
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0,
        )
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch,async_scheduling", [("llama", True), ("qwen2", False), ("qwen3", True)])
def test_engine_greedy_equals_hf_generate(arch, async_scheduling, hf_checkpoints):
    directory, hf_model = hf_checkpoints(arch)
    # 4-token blocks, 24 usable: far less than the 4 x ~60 positions the requests need together.
    eng = make_engine(directory, num_kv_blocks=25, max_num_batched_tokens=32, max_model_len=96,
                      async_scheduling=async_scheduling)
    rng = np.random.RandomState(7)
    plan = [(0, 37, 20), (0, 5, 24), (2, 50, 12), (3, 12, 30), (9, 70, 8)]  # (arrival step, prompt len, new tokens)
    prompts = {f"r{i}": rng.randint(3, 300, size=n).tolist() for i, (_, n, _) in enumerate(plan)}
    got: dict[str, list[int]] = {rid: [] for rid in prompts}
    step = 0
    while step < 500 and (step <= 9 or eng.has_unfinished()):
        for i, (at, _, new) in enumerate(plan):
            if at == step:
                eng.add_request(f"r{i}", prompts[f"r{i}"], SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
        for out in eng.step():
            got[out.request_id].extend(out.new_token_ids)
        step += 1
    assert eng.scheduler.num_preemptions > 0, "the test must exercise preemption"
    assert eng.scheduler.block_manager.num_used_blocks == 0
    for i, (_, _, new) in enumerate(plan):
        rid = f"r{i}"
        assert got[rid] == _hf_greedy(hf_model, prompts[rid], new), rid


def test_engine_with_the_pallas_kernel_equals_the_reference(hf_checkpoints):
    """The kernel in interpret mode inside the real engine: the same greedy tokens as the reference."""
    directory, _ = hf_checkpoints("qwen2")
    rng = np.random.RandomState(3)
    prompts = [rng.randint(3, 300, size=n).tolist() for n in (3, 21, 40)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref = make_engine(directory, attention_backend="reference").generate(prompts, params)
    eng = make_engine(directory, attention_backend="pallas")
    model = nnx.merge(eng.runner.loaded.graphdef, eng.runner.loaded.state)
    assert model.layers[0].self_attn.backend == "pallas_interpret"  # the kernel, interpreted on CPU
    assert eng.generate(prompts, params) == ref
