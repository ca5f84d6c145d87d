"""LoRA through the engine, at tensor parallelism 2 (one engine for most tests) and 1: greedy tokens
equal PEFT's, mixed batches, prefix-cache isolation, slot reuse after eviction, no compiles while
adapters are loaded, evicted or mixed, and a request queued behind its adapter's unload."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from jaxserve.config import ServeConfig
from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.llm_engine import LLMEngine, LoraInUseError
from jaxserve.engine.lora_slots import LoraNotFoundError
from jaxserve.sampling_params import SamplingParams
from tests.engine.engine_helpers import make_engine
from tests.engine.test_compilation import _Compiles
from tests.lora_helpers import write_peft_adapters

pytestmark = pytest.mark.hf_reference

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def peft_llama(hf_checkpoints, tmp_path_factory):
    """(checkpoint, HF model, name -> (adapter directory, PeftModel), prompts, name -> PEFT greedy tokens)."""
    directory, hf_model = hf_checkpoints("llama")
    adapters = write_peft_adapters(hf_model, tmp_path_factory.mktemp("peft"), seed=10)
    rng = np.random.RandomState(5)
    prompts = {name: rng.randint(3, 300, size=n).tolist() for name, n in (("base", 9), ("attn", 23), ("mlp", 5),
                                                                            ("all", 14))}
    expected = {name: _hf_greedy(adapters[name][1] if name != "base" else hf_model, prompts[name], 10)
                for name in prompts}
    return directory, hf_model, adapters, prompts, expected


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _engine(peft_llama, **overrides):
    directory, _, adapters, _, _ = peft_llama
    modules = tuple(f"{name}={d}" for name, (d, _) in adapters.items())
    # Two slots (and two host copies) for three adapters: mixes and reuse evict and re-read them.
    values = dict(enable_lora=True, lora_modules=modules, max_loras=2, max_cpu_loras=2, max_lora_rank=8,
                  tensor_parallel_size=2)
    return make_engine(directory, **{**values, **overrides})


def _lora(name: str) -> str | None:
    return None if name == "base" else name


def test_greedy_tokens_equal_peft_alone_and_mixed(peft_llama):
    _, _, _, prompts, expected = peft_llama
    eng = _engine(peft_llama)
    assert eng.runner.loaded.plan.tp == 2
    with _Compiles() as compiles:
        for name, prompt in prompts.items():  # each alone
            assert eng.generate([prompt], GREEDY, [_lora(name)]) == [expected[name]], name
        # Three adapters and the base model submitted together (at most two adapters run at once):
        # each row gets what it gets alone.
        names = list(prompts) * 2
        got = eng.generate([prompts[n] for n in names], GREEDY, [_lora(n) for n in names])
    assert got == [expected[n] for n in names]
    assert compiles == []
    assert len({tuple(t) for t in expected.values()}) == 4, "the adapters must change the tokens"


def test_prefix_cache_is_not_shared_between_adapters(peft_llama):
    _, _, _, prompts, expected = peft_llama
    eng = _engine(peft_llama)
    bm = eng.scheduler.block_manager
    prompt = prompts["attn"]  # 23 tokens: five full 4-token blocks to reuse
    hits0 = bm.prefix_hits
    assert eng.generate([prompt], GREEDY, ["attn"]) == [expected["attn"]]
    hits1 = bm.prefix_hits
    eng.generate([prompt], GREEDY, ["mlp"])  # the same tokens under another adapter: no hit
    eng.generate([prompt], GREEDY, [None])  # nor under the base model
    assert bm.prefix_hits == hits1
    assert eng.generate([prompt], GREEDY, ["attn"]) == [expected["attn"]]  # the same adapter: hits
    assert bm.prefix_hits > hits1 >= hits0


def test_slot_reuse_after_eviction(peft_llama):
    """Two slots, three adapters run one after another: the third evicts the least recently used,
    whose slot then serves another adapter; every run matches PEFT."""
    _, _, _, prompts, expected = peft_llama
    eng = _engine(peft_llama)
    ids = {name: eng.lora_ref(name).lora_id for name in ("attn", "mlp", "all")}
    with _Compiles() as compiles:
        for name in ("attn", "mlp", "all"):
            assert eng.generate([prompts[name]], GREEDY, [name]) == [expected[name]], name
        assert set(eng.loras._slots) == {ids["mlp"], ids["all"]}  # attn was evicted
        mlp_slot, loads = eng.loras.slot(ids["mlp"]), eng.loras.loads
        assert eng.generate([prompts["attn"]], GREEDY, ["attn"]) == [expected["attn"]]
    assert eng.loras.loads == loads + 1 and eng.loras.slot(ids["attn"]) == mlp_slot  # mlp's slot, rewritten
    assert compiles == []


def test_runtime_add_and_remove(peft_llama, tmp_path):
    _, _, adapters, prompts, expected = peft_llama
    eng = _engine(peft_llama)
    with _Compiles() as compiles:
        eng.add_lora("attn2", str(adapters["attn"][0]))
        assert eng.generate([prompts["attn"]], GREEDY, ["attn2"]) == [expected["attn"]]
        eng.add_request("busy", prompts["attn"], GREEDY, "attn2")
        with pytest.raises(LoraInUseError, match="1 request"):
            eng.remove_lora("attn2")
        while eng.has_unfinished():
            eng.step()
        eng.remove_lora("attn2")
    assert compiles == []
    with pytest.raises(KeyError, match="attn2"):
        eng.add_request("gone", prompts["attn"], GREEDY, "attn2")


@pytest.fixture(scope="module")
def tp1_engine(peft_llama):
    """A TP 1 engine (its fused q/k/v one shard), not cached: the last test here closes it."""
    directory, _, adapters, _, _ = peft_llama
    modules = [f"{name}={d}" for name, (d, _) in adapters.items()]
    return LLMEngine(ServeConfig(
        model=str(directory), max_num_seqs=2, max_num_batched_tokens=16, block_size=4, max_model_len=64,
        compilation_cache_dir="", dtype="float32", kv_cache_memory_gib=0.0625, enable_lora=True,
        lora_modules=modules, max_loras=3, max_lora_rank=8), progress=False)


def test_greedy_tokens_equal_peft_at_tp1(peft_llama, tp1_engine):
    _, _, _, prompts, expected = peft_llama
    assert tp1_engine.runner.loaded.plan.tp == 1
    names = ["all", *prompts]
    got = tp1_engine.generate([prompts[n] for n in names], GREEDY, [_lora(n) for n in names])
    assert got == [expected[n] for n in names]


def test_a_request_queued_behind_its_adapters_unload_gets_not_found(peft_llama, tp1_engine):
    """Submitted while its adapter was served but reaching the engine thread after the adapter's
    unload (one FIFO of commands): that request alone fails with LoraNotFoundError (HTTP 404, as for
    a request arriving after the unload); the unload succeeds and the engine keeps serving."""
    _, _, adapters, prompts, expected = peft_llama
    entered, hold = threading.Event(), threading.Event()
    step = tp1_engine.step

    def held_step() -> list:
        entered.set()
        hold.wait(30)
        return step()

    tp1_engine.step = held_step
    engine = AsyncEngine(lambda: tp1_engine)
    engine.start()
    engine.wait_ready(60)

    async def tokens(sub) -> list[int]:
        return [t for _, out in [x async for x in sub.outputs()] for t in out.new_token_ids]

    async def scenario() -> None:
        busy = engine.submit("busy", [prompts["base"]], [GREEDY])
        await asyncio.to_thread(entered.wait, 30)  # the engine thread now waits inside a step
        unload = asyncio.ensure_future(engine.unload_lora("attn"))
        await asyncio.sleep(0)  # the unload command is queued ...
        late = engine.submit("late", [prompts["attn"]], [GREEDY], lora="attn")  # ... and this request behind it
        hold.set()
        await unload
        with pytest.raises(LoraNotFoundError, match="unloaded"):
            await tokens(late)
        assert await tokens(busy) == expected["base"]
        with pytest.raises(LoraNotFoundError):  # after the unload: refused at once
            engine.submit("after", [prompts["attn"]], [GREEDY], lora="attn")
        await engine.load_lora("attn", str(adapters["attn"][0]))  # served again, under a new id
        assert await tokens(engine.submit("again", [prompts["attn"]], [GREEDY], lora="attn")) == expected["attn"]

    try:
        asyncio.run(scenario())
    finally:
        hold.set()
        engine.shutdown()
