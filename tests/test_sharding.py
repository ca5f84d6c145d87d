"""Tensor parallelism on 8 host devices: token-identical outputs, shardings by rule, clear errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxserve.sampling_params import SamplingParams
from jaxserve.sharding import TensorParallelError, check_tensor_parallel, spec_for
from jaxserve.weights.loader import read_model_config
from jaxserve.weights.orbax_checkpoint import read_orbax_config
from jaxserve.weights.source import resolve_model_source
from tests.engine.engine_helpers import make_engine
from tests.helpers import lookback_continue

def _prompts() -> list[list[int]]:
    rng = np.random.RandomState(5)
    return [rng.randint(3, 300, size=n).tolist() for n in (5, 23, 40, 2)]


# Each size costs an engine compile: llama checks TP 2 here (TP 4 below, from its orbax checkpoint)
# and qwen2 TP 4 (2 KV heads: each replicated twice), which the shardings test reuses.
@pytest.mark.hf_reference
@pytest.mark.parametrize("arch,tp", [("llama", 2), ("qwen2", 4)])
def test_tensor_parallel_gives_the_same_greedy_tokens(arch, tp, hf_checkpoints):
    assert len(jax.devices()) >= 4
    directory, _ = hf_checkpoints(arch)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = make_engine(directory).generate(_prompts(), params)
    eng = make_engine(directory, tensor_parallel_size=tp)
    assert eng.runner.loaded.plan.tp == tp
    assert eng.generate(_prompts(), params) == want
    assert eng.runner.loaded.plan.kv_replication == (2 if tp == 4 else 1)


@pytest.mark.hf_reference
def test_orbax_checkpoint_restores_into_any_tp(hf_checkpoints, tmp_path):
    import subprocess
    import sys

    directory, _ = hf_checkpoints("llama")
    out = tmp_path / "orbax"
    r = subprocess.run([sys.executable, "scripts/convert_checkpoint.py", "--model", str(directory), "--output",
                        str(out), "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "jaxserve_checkpoint.json").is_file()
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = make_engine(directory).generate(_prompts(), params)
    for tp in (1, 4):
        eng = make_engine(out, tensor_parallel_size=tp)
        qkv = eng.runner.loaded.state["layers"][0]["self_attn"]["qkv_proj"]["kernel"][...]
        assert qkv.sharding.spec == spec_for("layers/0/self_attn/qkv_proj/kernel")
        assert eng.generate(_prompts(), params) == want
    # A checkpoint of the earlier [in, out] layout is refused, not misread.
    marker = out / "jaxserve_checkpoint.json"
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps({**meta, "format": "jaxserve-orbax-1"}))
    with pytest.raises(ValueError, match="convert it again"):
        read_orbax_config(out)


@pytest.mark.hf_reference
def test_parameter_shardings_follow_the_rules(hf_checkpoints):
    directory, _ = hf_checkpoints("qwen2")
    eng = make_engine(directory, tensor_parallel_size=4)
    state = eng.runner.loaded.state
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    seen = 0
    for path, arr in flat:
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        key = key.removesuffix("/value")
        assert arr.sharding.spec == spec_for(key), key
        if arr.ndim == 2 and spec_for(key) != jax.sharding.PartitionSpec(None, None):
            per_device = arr.addressable_shards[0].data.nbytes
            assert per_device * 4 == arr.nbytes, key  # ~1/N of the matrix on each device
            seen += 1
    assert seen == 2 * 5 + 1  # qkv o gate up down per layer, and the LM head
    k_pages = eng.runner.kv_caches[0][0]
    assert k_pages.sharding.spec == jax.sharding.PartitionSpec(None, None, "model", None)
    assert k_pages.addressable_shards[0].data.shape[2] == 1  # one (replicated) KV head per device


@pytest.mark.hf_reference
def test_bad_tensor_parallel_sizes_fail_at_startup(hf_checkpoints):
    directory, _ = hf_checkpoints("llama")
    cfg, _ = read_model_config(resolve_model_source(str(directory)))
    with pytest.raises(TensorParallelError, match="does not divide the model's num_attention_heads"):
        check_tensor_parallel(cfg, 3, 8)
    with pytest.raises(TensorParallelError, match="needs 16 devices, but only 8 are available"):
        check_tensor_parallel(cfg, 16, 8)
    with pytest.raises(TensorParallelError, match="needs 16 devices"):
        make_engine(directory, tensor_parallel_size=16)


def test_serve_rejects_a_bad_tp_size_with_one_line(lookback_model):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "jaxserve.serve", "--model", str(lookback_model),
                        "--tensor-parallel-size", "3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: tensor_parallel_size 3 does not divide the model's num_attention_heads (4)"
    )


def test_tp_1_2_4_identical_on_the_lookback_model(lookback_model):
    # Torch-free: each device holds one KV head (TP 4 replicates them); the cache decides the tokens.
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    for tp in (1, 2, 4):
        assert make_engine(lookback_model, tensor_parallel_size=tp).generate(_prompts(), params) == [
            lookback_continue(p, 10) for p in _prompts()
        ], tp
