"""LoRA without torch (runs in both CI legs): adapter validation, the slot store + batched delta
against a numpy reference (fused q/k/v, TP 2 with repeated KV heads) and the scheduler's adapter
limit. The engine with hand-checkable adapters on the lookback model: tests/server/test_lora_server.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.engine.block_manager import BlockManager
from jaxserve.engine.lora_slots import LoraSlots
from jaxserve.engine.scheduler import Scheduler
from jaxserve.models.config import ModelConfig
from jaxserve.models.lora import LoraBatch, add_lora
from jaxserve.models.qkv_layout import QKVLayout
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling_params import SamplingParams
from jaxserve.sharding import make_plan, sharded_config
from jaxserve.weights.lora import LoraAdapterError, load_adapter
from tests.lora_helpers import write_adapter_by_hand

TINY = dict(hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=1, head_dim=8, num_layers=2)


def _config() -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, max_position_embeddings=64, rms_norm_eps=1e-6,
                       rope_theta=1e4, **TINY)


def _dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    d, f, nh, kh = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q_proj": (d, nh), "k_proj": (d, kh), "v_proj": (d, kh), "o_proj": (nh, d), "gate_proj": (d, f),
            "up_proj": (d, f), "down_proj": (f, d)}


@pytest.mark.parametrize("change,field", [
    ({"use_dora": True}, "use_dora"), ({"bias": "all"}, "bias"), ({"target_modules": ["lm_head"]}, "target_modules"),
    ({"target_modules": ["embed_tokens", "q_proj"]}, "target_modules"), ({"target_modules": ["fc1"]}, "target_modules"),
    ({"r": 32}, "r"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"peft_type": "IA3"}, "peft_type"),
    ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
])
def test_unsupported_adapters_are_errors_naming_the_field(tmp_path, change, field):
    write_adapter_by_hand(tmp_path, {"q_proj": (32, 32)}, 1, rank=4, alpha=8, seed=0, config=change)
    with pytest.raises(LoraAdapterError, match=f": {field}: "):
        load_adapter(tmp_path, max_rank=16, num_layers=2)


def test_adapter_tensors_for_other_modules_are_errors(tmp_path):
    write_adapter_by_hand(tmp_path, {"q_proj": (32, 32)}, 1, rank=4, alpha=8, seed=0,
                          prefix="base_model.model.model.embed_tokens.x")
    with pytest.raises(LoraAdapterError, match="adapter_model.safetensors: tensor .* not supported"):
        load_adapter(tmp_path, max_rank=16, num_layers=2)
    with pytest.raises(LoraAdapterError, match="not a directory"):
        load_adapter(tmp_path / "missing", max_rank=16, num_layers=2)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(LoraAdapterError, match="no adapter_config.json"):
        load_adapter(tmp_path, max_rank=16, num_layers=2)


def test_an_adapter_of_another_model_is_refused(tmp_path):
    cfg = _config()
    write_adapter_by_hand(tmp_path, {"q_proj": (16, 32)}, 1, rank=4, alpha=8, seed=0)
    slots = LoraSlots(cfg, make_plan(cfg, 1), max_loras=1, max_rank=8, max_cpu_loras=1, dtype=np.float32)
    with pytest.raises(LoraAdapterError, match="do not fit the base model"):
        slots.add("x", tmp_path)


@pytest.mark.parametrize("tp", [1, 2])
def test_slots_and_delta_equal_a_numpy_reference(tmp_path, tp):
    """Two adapters (rank 4 all targets; rank 8 rsLoRA on q/v/down) in slots, rows mixed with the
    base model: each row's delta is ``scaling * B A x`` of its own adapter, in the fused q/k/v layout
    (TP 2 repeats the one KV head)."""
    cfg = _config()
    dims = _dims(cfg)
    w1 = write_adapter_by_hand(tmp_path / "a", dims, 2, rank=4, alpha=8, seed=1)
    sub = {m: dims[m] for m in ("q_proj", "v_proj", "down_proj")}
    w2 = write_adapter_by_hand(tmp_path / "b", sub, 2, rank=8, alpha=4, seed=2, config={"use_rslora": True})
    plan = make_plan(cfg, tp)
    served = sharded_config(cfg, plan)
    slots = LoraSlots(served, plan, max_loras=3, max_rank=8, max_cpu_loras=3, dtype=np.float32)
    ids = {n: slots.add(n, tmp_path / n).lora_id for n in ("a", "b")}
    slots.activate(set(ids.values()))
    refs = {"a": (w1, 8 / 4), "b": (w2, 4 / np.sqrt(8))}
    rows = [None, "a", "b", "a", None, "b"]
    slot_T = np.array([-1 if r is None else slots.slot(ids[r]) for r in rows], np.int32)
    rng = np.random.RandomState(0)
    layout = QKVLayout(served.num_heads, served.num_kv_heads, served.head_dim, tp=tp, kv_replication=plan.kv_replication)
    for layer in range(2):
        lora = LoraBatch(slots.layers, jnp.asarray(slot_T)).layer(layer)
        for target, parts in (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("o_proj", ("o_proj",)),
                              ("gate_proj", ("gate_proj",)), ("down_proj", ("down_proj",))):
            x = rng.randn(len(rows), dims[parts[0]][0]).astype(np.float32)
            width = layout.num_features if target == "qkv_proj" else dims[parts[0]][1]
            qkv = layout if target == "qkv_proj" else None
            got = np.asarray(jax.jit(add_lora, static_argnums=(3, 4))(jnp.zeros((len(rows), width)), x, lora, target, qkv))
            pieces = layout.split(jnp.asarray(got)) if target == "qkv_proj" else (got,)
            for part, piece in zip(parts, pieces, strict=True):
                piece = np.asarray(piece).reshape(len(rows), -1)
                for i, name in enumerate(rows):
                    want = np.zeros(dims[part][1], np.float32)
                    if name is not None and (layer, part) in refs[name][0]:
                        a, b = refs[name][0][(layer, part)]
                        want = refs[name][1] * b @ (a @ x[i])
                    if part in ("k_proj", "v_proj") and plan.kv_replication > 1:  # served KV heads repeat the checkpoint's
                        want = np.repeat(want.reshape(-1, served.head_dim), plan.kv_replication, axis=0).ravel()
                    if name is None:
                        assert not piece[i].any(), (target, part, i)  # the base model's rows: exactly 0
                    np.testing.assert_allclose(piece[i], want, rtol=1e-5, atol=1e-5, err_msg=f"{target} {part} row {i}")


def test_scheduler_runs_at_most_max_loras_adapters():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64, max_loras=2)
    reqs = [Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=4), max_tokens=4, lora_id=lid)
            for i, lid in enumerate([1, 2, 3, 0, 1, 3])]
    for r in reqs:
        sched.add(r)
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["r0", "r1", "r3", "r4"]  # adapter 3 waits
    sched.finish(reqs[1], RequestStatus.FINISHED_STOPPED)
    assert [s.request.request_id for s in sched.schedule().scheduled][-2:] == ["r2", "r5"]

