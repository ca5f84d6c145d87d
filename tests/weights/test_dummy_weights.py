"""--load-format dummy: random weights from a directory holding only config.json and a tokenizer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxserve.sampling_params import SamplingParams
from jaxserve.sharding import spec_for
from tests.engine.engine_helpers import make_engine
from tests.helpers import hf_config, write_tiny_tokenizer


@pytest.fixture(scope="module")
def config_only_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("qwen2-config-only")
    cfg = hf_config("qwen2")  # tied embeddings, q/k/v biases
    cfg.architectures = ["Qwen2ForCausalLM"]
    cfg.save_pretrained(str(directory))
    write_tiny_tokenizer(directory)
    return directory


def test_auto_format_needs_the_weights(config_only_dir: Path) -> None:
    with pytest.raises(Exception, match="safetensors|missing"):
        make_engine(config_only_dir)


@pytest.mark.parametrize("tp", [1, 2])
def test_dummy_weights_serve_with_the_rules_shardings(config_only_dir: Path, tp: int) -> None:
    eng = make_engine(config_only_dir, load_format="dummy", tensor_parallel_size=tp)
    state = eng.runner.loaded.state
    norm = np.asarray(state["layers"][0]["input_layernorm"]["weight"][...])
    bias = np.asarray(state["layers"][0]["self_attn"]["qkv_proj"]["bias"][...])
    qkv = state["layers"][1]["self_attn"]["qkv_proj"]["kernel"][...]
    assert (norm == 1).all() and (bias == 0).all()
    assert 0.015 < float(np.std(np.asarray(qkv))) < 0.025
    assert qkv.sharding.spec == spec_for("layers/1/self_attn/qkv_proj/kernel")
    assert len(qkv.sharding.device_set) == tp
    head, emb = state["lm_head"]["kernel"][...], state["embed_tokens"]["embedding"][...]
    if tp == 1:  # tied: one buffer, as when a real checkpoint is loaded
        assert head is emb
    else:
        assert head.sharding.spec == spec_for("lm_head/kernel")
        np.testing.assert_array_equal(np.asarray(head), np.asarray(emb))  # tied values, vocab-parallel copy
    out = eng.generate([[5, 6, 7], [9] * 20], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert [len(o) for o in out] == [6, 6]
    assert all(0 <= t < eng.model_config.vocab_size for o in out for t in o)


_DIGEST = """
import hashlib, sys
import numpy as np
from jaxserve.sharding import make_plan
from jaxserve.weights.loader import load_model, read_model_config
from jaxserve.weights.source import resolve_model_source
source = resolve_model_source(sys.argv[1])
cfg, _ = read_model_config(source)
loaded = load_model(source, cfg, np.float32, plan=make_plan(cfg, 1), progress=False, dummy=True)
h = hashlib.sha256()
for i in range(cfg.num_layers):
    h.update(np.asarray(loaded.state["layers"][i]["mlp"]["down_proj"]["kernel"][...]).tobytes())
print(h.hexdigest(), np.asarray(loaded.state["layers"][0]["mlp"]["down_proj"]["kernel"][...]).dtype)
"""


def test_dummy_weights_are_the_same_in_every_run(config_only_dir: Path) -> None:
    """Two processes draw the same values (no compile needed: only the loader runs)."""
    runs = [subprocess.run([sys.executable, "-c", _DIGEST, str(config_only_dir)], capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    digests = [r.stdout.split() for r in runs]
    assert digests[0] == digests[1] and digests[0][1] == "float32"
    # The values are drawn, not constant: a different seed path would change the digest.
    assert len(set(digests[0][0])) > 1


def test_dummy_weights_are_one_model_for_every_tp(config_only_dir: Path) -> None:
    """Drawn per checkpoint tensor and then laid out: TP 1 and TP 2 serve the same weights."""
    from jaxserve.models.qkv_layout import QKVLayout

    engines = {tp: make_engine(config_only_dir, load_format="dummy", tensor_parallel_size=tp) for tp in (1, 2)}
    cfg = engines[1].model_config
    qkv = {tp: np.asarray(e.runner.loaded.state["layers"][1]["self_attn"]["qkv_proj"]["kernel"][...])
           for tp, e in engines.items()}
    # TP 2's rows are TP 1's ([q | k | v] on one device) gathered into the shard-major layout.
    rows = QKVLayout(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, tp=2).fused_rows()
    np.testing.assert_array_equal(qkv[2], qkv[1][rows])
    assert not np.array_equal(qkv[2], qkv[1])
    prompts = [[5, 6, 7], [9] * 20, list(range(40, 75))]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = engines[1].generate(prompts, params)
    assert engines[2].generate(prompts, params) == want
    del engines  # TP 4 repeats each of the 2 KV heads twice: still the same model
    assert make_engine(config_only_dir, load_format="dummy", tensor_parallel_size=4).generate(prompts, params) == want
