"""LoRA logits equal Hugging Face PEFT's: three adapters (attention, MLP, all targets) and the base
model in one batch, each row against its own PeftModel, float32, TP 1 and 2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve.engine.lora_slots import LoraSlots
from jaxserve.models.attention import build_host_metadata
from jaxserve.models.lora import LoraBatch
from jaxserve.sharding import make_plan, sharded_config
from jaxserve.weights.loader import load_model, read_model_config
from jaxserve.weights.source import resolve_model_source
from tests.lora_helpers import ADAPTERS, write_peft_adapters

pytestmark = pytest.mark.hf_reference

PAGE = 8
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def peft_llama(hf_checkpoints, tmp_path_factory):
    directory, hf_model = hf_checkpoints("llama")
    return directory, hf_model, write_peft_adapters(hf_model, tmp_path_factory.mktemp("peft"))


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)[None]).logits[0].numpy()


def _forward(directory, adapters, tp: int, prompts: list[np.ndarray], names: list[str | None]) -> np.ndarray:
    """Last-position logits of ``prompts`` in one batch, row i under adapter ``names[i]``."""
    src = resolve_model_source(str(directory))
    cfg, _ = read_model_config(src)
    plan = make_plan(cfg, tp)
    loaded = load_model(src, cfg, jnp.float32, plan=plan, progress=False)
    slots = LoraSlots(sharded_config(cfg, plan), plan, max_loras=len(adapters), max_rank=8, max_cpu_loras=3,
                      dtype=np.float32)
    ids = {name: slots.add(name, d).lora_id for name, (d, _) in adapters.items()}
    slots.activate(set(ids.values()))
    lens = [len(p) for p in prompts]
    num_tokens = 16 * -(-sum(lens) // 16)
    tables, start = [], 1
    for n in lens:
        tables.append(list(range(start, start + -(-n // PAGE))))
        start += len(tables[-1])
    width = max(map(len, tables))
    meta = build_host_metadata(lens, lens, tables, PAGE, num_tokens=num_tokens, num_seqs=len(prompts), table_width=width)
    tokens = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    slot_T = np.full(num_tokens, -1, np.int32)
    t = 0
    for p, name in zip(prompts, names, strict=True):
        tokens[t : t + len(p)], positions[t : t + len(p)] = p, np.arange(len(p))
        slot_T[t : t + len(p)] = slots.slot(ids[name]) if name else -1
        t += len(p)
    last = np.cumsum(lens) - 1
    k = sharded_config(cfg, plan).num_kv_heads
    caches = [(jnp.zeros((start, PAGE, k, cfg.head_dim)),) * 2 for _ in range(cfg.num_layers)]

    @jax.jit
    def forward(state, lora_layers, caches, tokens, positions, meta, idx, slot_T):
        model = nnx.merge(loaded.graphdef, state)
        return model(tokens, positions, caches, meta, idx, LoraBatch(lora_layers, slot_T))[0]

    return np.asarray(forward(loaded.state, slots.layers, caches, tokens, positions, meta, last.astype(np.int32), slot_T))


@pytest.mark.parametrize("tp", [1, 2])
def test_mixed_batch_logits_match_peft(tp, peft_llama):
    directory, hf_model, adapters = peft_llama
    rng = np.random.RandomState(tp)
    names = [None, "attn", "mlp", "all", "all"]
    prompts = [rng.randint(3, 300, size=n) for n in (11, 20, 7, 16, 9)]
    got = _forward(directory, adapters, tp, prompts, names)
    for row, (p, name) in enumerate(zip(prompts, names, strict=True)):
        ref = _hf_logits(adapters[name][1] if name else hf_model, p)[-1]
        assert np.abs(got[row] - ref).max() <= REL_TOL * np.abs(ref).max(), (row, name)
    # The adapters change the logits (the fixture can fail the test): each differs from the base model.
    base = _hf_logits(hf_model, prompts[3])[-1]
    assert np.abs(got[3] - base).max() > 100 * REL_TOL * np.abs(base).max()
    assert set(ADAPTERS) == {"attn", "mlp", "all"}
