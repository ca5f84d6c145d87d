"""The engine's whole compiled step (model, attention backend, sampler, donated KV pages) lowers
for CUDA with the Pallas kernel and for TPU with the bundled TPU kernel, on one device and
sharded over two, for decode and mixed buckets — on this CPU-only machine."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import pytest

from jaxserve.engine.compilation import BucketPolicy
from jaxserve.engine.model_runner import ModelRunner
from jaxserve.models.config import ModelConfig
from jaxserve.sharding import ShardingPlan, kv_replication
from jaxserve.weights.loader import abstract_loaded_model
from tests.lowering.helpers import KERNEL_CALL, abstract_mesh, export

# Two-layer models with the Qwen2.5-7B and -0.5B attention layouts (28/4 heads of 128, 14/2 of 64).
CONFIG = ModelConfig(
    architecture="Qwen2ForCausalLM", vocab_size=512, hidden_size=512, intermediate_size=1024, num_layers=2,
    num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096,
    tie_word_embeddings=True, qkv_bias=True,
)
CONFIG_HEAD64 = dataclasses.replace(CONFIG, hidden_size=896, num_heads=14, num_kv_heads=2, head_dim=64)
BACKEND = {"h100": "pallas", "v5e": "tpu", "v6e": "tpu"}


def abstract_runner(device: str, tp: int, config: ModelConfig = CONFIG) -> ModelRunner:
    plan = ShardingPlan(abstract_mesh(device, tp), kv_replication(config, tp))
    loaded = abstract_loaded_model(config, jnp.bfloat16, backend=BACKEND[device], compute_dtype=jnp.bfloat16,
                                   plan=plan)
    return ModelRunner(loaded, num_blocks=256, block_size=16, max_model_len=1024,
                       buckets=BucketPolicy(max_num_seqs=32, max_num_batched_tokens=256), backend=BACKEND[device])


@pytest.mark.parametrize(("device", "config"), [("h100", CONFIG), ("h100", CONFIG_HEAD64), ("v5e", CONFIG),
                                               ("v6e", CONFIG)])
@pytest.mark.parametrize("tp", [1, 2])
def test_engine_steps_lower(device, config, tp):
    runner = abstract_runner(device, tp, config)
    shapes = runner.buckets.all_shapes()
    chosen = [next(s for s in shapes if s.decode_only), max(s for s in shapes if not s.decode_only and not s.extras),
              next(s for s in shapes if s.extras and not s.decode_only)]
    if tp == 2 and config is CONFIG:  # the grammar mask's unpacking, once per device kind (under TP)
        chosen.append(next(s for s in shapes if s.grammar and s.decode_only))
    call = KERNEL_CALL["cuda" if device == "h100" else "tpu"]
    for shape in chosen:
        # A grammar shape is a forward (the kernel) then a sampling executable (the mask).
        fn, args = runner.programs(shape)[0]
        if shape.grammar:
            sample_fn, sample_args = runner.programs(shape)[1]
            sampling = export(sample_fn, sample_args, device, runner.loaded.plan.mesh).mlir_module()
            assert "x32xi32>" in sampling and call not in sampling, shape
        exported = export(fn, args, device, runner.loaded.plan.mesh)
        text = exported.mlir_module()
        assert call in text, f"{shape}: no {call}"
        assert exported.nr_devices == tp
        # Attention runs per shard (shard_map): a manual region around the kernel under TP.
        assert ("SPMDFullToShardShape" in text or "manual_computation" in text) == (tp > 1), shape


def test_the_tpu_kernel_refuses_head_dim_64_clearly():
    with pytest.raises(ValueError, match="multiple of 128.*--attention-backend reference"):
        abstract_runner("v5e", 1, CONFIG_HEAD64)


def test_an_abstract_runner_cannot_serve():
    runner = abstract_runner("h100", 1)
    with pytest.raises(RuntimeError, match="was not compiled"):
        runner.dispatch([], [], {})


@pytest.mark.parametrize("device", ["h100", "v5e"])
def test_pooling_steps_lower(device):
    """A decoder embedder's paged step (``PoolingRunner``: no LM head, no sampling) lowers with the
    device's attention kernel too."""
    from jaxserve.engine.pooling_runner import PoolingRunner
    from jaxserve.models.bert import PoolingConfig

    plan = ShardingPlan(abstract_mesh(device, 1), kv_replication(CONFIG, 1))
    loaded = abstract_loaded_model(CONFIG, jnp.bfloat16, backend=BACKEND[device], compute_dtype=jnp.bfloat16,
                                   plan=plan)
    runner = PoolingRunner(loaded, pooling=PoolingConfig("lasttoken", True), num_blocks=256, block_size=16,
                           max_model_len=1024, buckets=BucketPolicy(32, 256, sampling=False), backend=BACKEND[device])
    shape = max(runner.buckets.all_shapes())
    text = export(runner.step_fn, runner.abstract_args(shape), device, plan.mesh).mlir_module()
    assert KERNEL_CALL["cuda" if device == "h100" else "tpu"] in text
    assert f"tensor<{shape.num_seqs}x{CONFIG.hidden_size}xf32>" in text
