"""``python -m jaxserve.serve --config smollm2.yaml`` (or ``jaxserve serve MODEL [flags]``): the
OpenAI-compatible server.

The HTTP server starts at once (``/health`` and requests answer 503 with ``Retry-After`` while the
model loads and compiles); configuration and model-location errors end the process with one
sentence before that, and an engine that fails to start (or crashes later) ends it with one
sentence and exit status 1.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from typing import TYPE_CHECKING, NamedTuple

from jaxserve.config import ConfigError, ServeConfig
from jaxserve.config_loading import load_configs
from jaxserve.weights.source import ModelNotFoundError, resolve_model_source

if TYPE_CHECKING:  # jax, uvicorn and the engine load only once the configuration is known to be good
    from collections.abc import Callable

    import uvicorn

    from jaxserve.engine.async_embedding import AsyncEmbeddingEngine
    from jaxserve.engine.async_engine import AsyncEngine
    from jaxserve.engine.kv_cache_size import DeviceMemory
    from jaxserve.models import ModelConfig

    Engine = AsyncEngine | AsyncEmbeddingEngine

logger = logging.getLogger("jaxserve")


def setup_runtime(config: ServeConfig, memory_share: float | None = None) -> None:
    """Logging, the host allocator (``engine/host_memory.py``, CPU only), XLA's accelerator pool
    (``memory_share`` of the card: the served models' shares together; more than the card leaves
    jax's default for ``check_memory`` to refuse), and the persistent XLA compilation cache (so
    restarts skip compiles)."""
    from jaxserve.server.request_id import RequestIdFilter

    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:  # lines written while a request is handled name it
        handler.addFilter(RequestIdFilter())
    from jaxserve.engine.host_memory import keep_freed_host_memory
    from jaxserve.engine.kv_cache_size import reserve_device_memory

    keep_freed_host_memory()  # CPU only; before jax starts its CPU client's threads
    share = config.gpu_memory_utilization if memory_share is None else memory_share
    if share <= 1.0:
        reserve_device_memory(share)  # before jax starts a GPU backend
    import jax

    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class Preflight(NamedTuple):
    """What ``preflight`` found: the task served and a decoder's architecture config (None for an
    encoder), read once for every start-up check that needs it."""

    task: str
    model_config: ModelConfig | None


def preflight(config: ServeConfig) -> Preflight:
    """Checks that need the model's config but not its weights (location, architecture, task, TP
    size, an encoder's sentence-transformers pipeline)."""
    import jax

    from jaxserve.sharding import check_tensor_parallel
    from jaxserve.weights.encoder_loader import is_encoder_checkpoint, read_encoder_config
    from jaxserve.weights.loader import read_model_config
    from jaxserve.weights.sentence_transformers import read_sentence_transformers

    source = resolve_model_source(config.model)
    is_encoder = source.kind == "hf" and is_encoder_checkpoint(source.path)
    task = config.task_for(is_encoder)
    if is_encoder:
        read_encoder_config(source.path, config.hf_overrides)
        read_sentence_transformers(source.path)
        if config.tensor_parallel_size != 1 or config.num_processes != 1:
            raise ConfigError("an embedding (encoder) model runs on one device: tensor_parallel_size and "
                              "num_processes must be 1")
        return Preflight(task, None)
    if config.hf_overrides:
        raise ConfigError("hf_overrides: only supported for encoder (embedding) models so far")
    model_config, _ = read_model_config(source)
    if task == "embed":
        from jaxserve.engine.embedders import uses_paged_engine

        if not uses_paged_engine(config, source) and (config.tensor_parallel_size != 1 or config.num_processes != 1):
            raise ConfigError("a decoder embedder with mean, cls or max pooling runs on one device (last-token "
                              "pooling shards): tensor_parallel_size and num_processes must be 1")
    check_tensor_parallel(model_config, config.tensor_parallel_size, len(jax.devices()))
    return Preflight(task, model_config)


def cli_argv(argv: list[str]) -> list[str]:
    """``serve MODEL [flags]`` (the console script's form, vLLM's ``vllm serve MODEL``) as plain flags."""
    if argv[:1] != ["serve"]:
        return argv
    argv = argv[1:]
    if argv and not argv[0].startswith("-"):
        if "--model" in argv:
            raise ConfigError(f"the model is given twice: {argv[0]!r} and --model")
        return ["--model", argv[0], *argv[1:]]
    return argv


def watch_engines(engines: list[Engine], server: uvicorn.Server, configs: list[ServeConfig]) -> None:
    """Runs beside the server: starts the engines one after another (embedding models first; one at a
    time, so each paged model's KV budget knows which device bytes the others hold), says "ready",
    starts the stats logs, and stops
    the server when an engine fails to start or its loop dies (the process then exits non-zero)."""
    from jaxserve.engine.async_engine import EngineDeadError, EngineState
    from jaxserve.engine.stats_logger import StatsLogger

    order = sorted(range(len(engines)), key=lambda i: engines[i].task != "embed")
    for i in order:
        engines[i].start()
        try:
            engines[i].wait_ready()
        except EngineDeadError:
            server.should_exit = True
            return
    c = configs[0]
    logger.info("ready: serving %s on %s", ", ".join(x.model_name for x in configs), url(c))
    if not c.disable_log_stats:
        for e in engines:
            if e.task == "generate":
                StatsLogger(e).start()
    while all(e.is_ready for e in engines):
        for e in engines:
            e.join(timeout=0.5)
    if any(e.state is EngineState.DEAD for e in engines):
        server.should_exit = True


def url(config: ServeConfig) -> str:
    return f"{'https' if config.ssl_certfile else 'http'}://{config.host}:{config.port}"


def holds_kv_cache(config: ServeConfig, task: str) -> bool:
    """Whether the model runs on the paged engine (generate, or a last-token decoder embedder)."""
    if task == "generate":
        return True
    from jaxserve.engine.embedders import uses_paged_engine

    return uses_paged_engine(config, resolve_model_source(config.model))


def check_memory(configs: list[ServeConfig], kv_cache: list[bool], platform: str,
                 device: DeviceMemory | None = None, lora_gib: list[float] | None = None) -> None:
    """Every model's budget fits beside the others', or a one-line ConfigError naming the one that does not.

    CPU: the KV caches' --kv-cache-memory-gib (models with ``kv_cache``) and the LoRA slots and host
    copies (``lora_gib``: ``lora_host_gib``) against the host's available memory. Accelerators: each
    model's --gpu-memory-utilization is its share of the card (as for several vLLM processes on one
    GPU; its LoRA slots are paid from it, ``kv_cache_size.num_kv_blocks``); with several models the
    shares, added in order, must fit in XLA's pool (``device``; ``setup_runtime`` sized it to their
    sum). One model keeps its share within whatever pool there is (``kv_cache_size.device_budget_bytes``).
    The LoRA host copies must fit in the host's available memory on accelerators too.
    """
    lora_gib = lora_gib or [0.0] * len(configs)
    if platform == "cpu" or any(lora_gib):
        _check_host(configs, kv_cache if platform == "cpu" else [False] * len(configs), lora_gib)
    if platform == "cpu" or len(configs) == 1:
        return
    if device is None:
        from jaxserve.engine.kv_cache_size import device_memory

        device = device_memory(platform)
    total = 0.0
    for c in configs:
        total += c.gpu_memory_utilization
        if total > min(1.0, device.pool_fraction) + 1e-9:
            room = ("more than the whole device" if total > 1.0 + 1e-9 else
                    f"more than XLA's pool holds ({device.pool_fraction:g} of it, XLA_PYTHON_CLIENT_MEM_FRACTION)")
            raise ConfigError(
                f"model {c.model_name}: its --gpu-memory-utilization share ({c.gpu_memory_utilization:g} of the "
                f"{device.card_bytes / (1 << 30):.1f} GiB {platform} device) does not fit: the models' shares add up "
                f"to {total:g}, {room}; give each models: entry its own gpu-memory-utilization")


def _check_host(configs: list[ServeConfig], kv_cache: list[bool], lora_gib: list[float]) -> None:
    """The host-memory part of ``check_memory``: KV caches (CPU) and LoRA memory, added in order."""
    available = _available_host_gib()
    total = 0.0
    for c, kv, lora in zip(configs, kv_cache, lora_gib, strict=True):
        need = (c.kv_cache_memory_gib if kv else 0.0) + lora
        if not need:
            continue
        total += need
        if available is not None and total > available:
            what = (f"its KV cache ({c.kv_cache_memory_gib:g} GiB)" if kv else "") + (" and " if kv and lora else "")
            what += f"its LoRA slots and host copies ({lora:.3g} GiB)" if lora else ""
            raise ConfigError(f"model {c.model_name}: {what} does not fit: the models need {total:.4g} GiB, this host "
                              f"has {available:.1f} GiB available")


def lora_host_gib(config: ServeConfig, model_config: ModelConfig | None, platform: str) -> float:
    """GiB of host memory ``config``'s LoRA adapters may take (``lora_slots.host_bytes``; 0 without LoRA,
    and for an encoder, which ``task_for`` refuses LoRA)."""
    if not config.enable_lora or model_config is None:
        return 0.0
    from jaxserve.engine.lora_slots import host_bytes

    return host_bytes(model_config, max_loras=config.max_loras, max_rank=config.max_lora_rank,
                      max_cpu_loras=config.cpu_loras, on_cpu=platform == "cpu") / (1 << 30)


def _available_host_gib() -> float | None:
    try:
        for line in open("/proc/meminfo"):  # noqa: SIM115 - tiny file
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return None


def listen(config: ServeConfig) -> socket.socket:
    """The server's listening socket, bound before anything slow starts (ConfigError if it cannot be)."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {e.strerror or e}") from None
    return sock


def main(argv: list[str] | None = None) -> int:
    """Serve until shut down: exit 0 after a clean shutdown, 2 for a bad configuration, 1 when an engine fails."""
    try:
        configs = load_configs(cli_argv(sys.argv[1:] if argv is None else argv))
        for c in configs:
            resolve_model_source(c.model)
        sock = listen(configs[0]) if configs[0].process_id == 0 else None
    except (ConfigError, ModelNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = configs[0]  # the server settings (the same in every entry)
    setup_runtime(config, sum(c.gpu_memory_utilization for c in configs))
    from jaxserve.engine.multihost import initialize, shutdown

    initialize(config.num_processes, config.process_id, config.coordinator_address)
    try:
        tasks = check_models(configs)
    except ValueError as e:  # TensorParallelError, unsupported architecture, bad checkpoint config, memory
        print(f"error: {e}", file=sys.stderr)
        return 2

    from jaxserve.engine.async_engine import EngineState
    from jaxserve.engine.llm_engine import LLMEngine

    if config.process_id != 0:  # a follower: same weights and compiled steps, no HTTP, no scheduler
        steps = LLMEngine(config).runner.follow()
        logger.info("process %d: leader stopped after %d steps", config.process_id, steps)
        shutdown()
        return 0
    engines = [make_engine(c, t) for c, t in zip(configs, tasks, strict=True)]

    def stop() -> None:
        for e in engines:
            e.shutdown()  # also releases the followers of a multi-host launch
        shutdown()

    server = build_server(configs, engines, stop)
    threading.Thread(target=watch_engines, args=(engines, server, configs), name="jaxserve-watch", daemon=True).start()
    logger.info("serving %s on %s (loading in the background)", ", ".join(c.model_name for c in configs), url(config))
    server.run(sockets=[sock])
    failed = next((e for e in engines if e.state in (EngineState.FAILED, EngineState.DEAD)), None)
    if failed is not None:
        print(f"error: {failed.error}", file=sys.stderr)
        return 1
    return 0


def check_models(configs: list[ServeConfig]) -> list[str]:
    """Each model's ``preflight``, then their memory budgets together (``check_memory``); the tasks
    served. A ValueError names what cannot be served (``main`` prints it and exits 2)."""
    import jax

    checked = [preflight(c) for c in configs]
    platform = jax.default_backend()
    check_memory(configs, [holds_kv_cache(c, p.task) for c, p in zip(configs, checked, strict=True)], platform,
                 lora_gib=[lora_host_gib(c, p.model_config, platform) for c, p in zip(configs, checked, strict=True)])
    return [p.task for p in checked]


def build_server(configs: list[ServeConfig], engines: list[Engine],
                 on_shutdown: Callable[[], None]) -> uvicorn.Server:
    """The app over ``engines`` in a draining uvicorn server, with the access log's filters (no
    ``/health`` polls; each line carries its request id)."""
    import uvicorn

    from jaxserve.server.app import build_app
    from jaxserve.server.request_id import AccessLogRequestId, uvicorn_log_config

    config = configs[0]  # the server settings (the same in every entry)
    server = draining_server(uvicorn.Config(
        build_app(configs, engines, on_shutdown=on_shutdown), host=config.host, port=config.port,
        log_level=config.log_level, timeout_graceful_shutdown=5, access_log=not config.disable_uvicorn_access_log,
        ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile, log_config=uvicorn_log_config(),
    ), config.shutdown_timeout)
    access = logging.getLogger("uvicorn.access")  # after uvicorn configured logging
    access.addFilter(_drop_health_polls)
    access.addFilter(AccessLogRequestId())
    return server


def draining_server(uv_config: uvicorn.Config, timeout: float) -> uvicorn.Server:
    """uvicorn's server, except that the first SIGTERM or Ctrl-C runs the app's ``Drain`` (up to
    ``timeout`` s) before the server stops, and a second one stops it at once. The signal is not
    re-raised afterwards (uvicorn's default), so a drained shutdown exits 0."""
    import asyncio

    import uvicorn

    class DrainingServer(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None
        drain_started = False
        drain_task: asyncio.Task | None = None

        async def startup(self, sockets: list | None = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig: int, frame: object) -> None:
            """The first signal starts the app's drain on the event loop; a later one (or one before
            start-up) is uvicorn's: stop, then force."""
            if self.loop is None or self.drain_started:
                self.force_exit = self.should_exit
                self.should_exit = True
                return
            self.drain_started = True
            self.loop.call_soon_threadsafe(self._start_drain)

        def _start_drain(self) -> None:
            self.drain_task = asyncio.get_running_loop().create_task(self._drain_then_stop())

        async def _drain_then_stop(self) -> None:
            try:
                await self.config.app.state.drain.run(timeout)
            finally:
                self.should_exit = True

    return DrainingServer(uv_config)


def make_engine(config: ServeConfig, task: str) -> Engine:
    """The thread-hosted engine for ``task`` (not started)."""
    if task == "embed":
        from jaxserve.engine.async_embedding import AsyncEmbeddingEngine
        from jaxserve.engine.pooling_engine import build_embedding_engine

        return AsyncEmbeddingEngine(lambda: build_embedding_engine(config), log_requests=config.enable_log_requests)
    from jaxserve.engine.async_engine import AsyncEngine
    from jaxserve.engine.llm_engine import LLMEngine

    return AsyncEngine(
        lambda: LLMEngine(config), max_queue_size=config.max_queue_size, log_requests=config.enable_log_requests,
        max_undelivered=config.max_undelivered_chunks,
    )


def _drop_health_polls(record: logging.LogRecord) -> bool:
    """Access-log filter: ``/health`` polls (a supervisor's, every second) are not logged."""
    args = record.args
    return not (isinstance(args, tuple) and len(args) >= 3 and args[2] == "/health")


if __name__ == "__main__":
    sys.exit(main())
