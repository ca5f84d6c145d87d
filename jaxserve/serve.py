"""``python -m jaxserve.serve --config smollm2.yaml`` (or ``jaxserve serve MODEL [flags]``): the
OpenAI-compatible server.

The HTTP server starts at once (``/health`` and requests answer 503 with ``Retry-After`` while the
model loads and compiles); configuration and model-location errors end the process with one
sentence before that, and an engine that fails to start (or crashes later) ends it with one
sentence and exit status 1.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import TYPE_CHECKING

from jaxserve.config import ConfigError, ServeConfig, load_config
from jaxserve.weights.source import ModelNotFoundError, resolve_model_source

if TYPE_CHECKING:  # jax, uvicorn and the engine load only once the configuration is known to be good
    import uvicorn

    from jaxserve.engine.async_embedding import AsyncEmbeddingEngine
    from jaxserve.engine.async_engine import AsyncEngine

logger = logging.getLogger("jaxserve")


def setup_runtime(config: ServeConfig) -> None:
    """Logging and the persistent XLA compilation cache (so restarts skip compiles)."""
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from jaxserve.engine.kv_cache_size import reserve_device_memory

    reserve_device_memory(config.gpu_memory_utilization)  # before jax starts a GPU backend
    import jax

    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def preflight(config: ServeConfig) -> str:
    """Checks that need the model's config but not its weights (location, architecture, task, TP
    size, an encoder's sentence-transformers pipeline); returns the task served."""
    import jax

    from jaxserve.sharding import check_tensor_parallel
    from jaxserve.weights.encoder_loader import is_encoder_checkpoint, read_encoder_config
    from jaxserve.weights.loader import read_model_config
    from jaxserve.weights.sentence_transformers import read_sentence_transformers

    source = resolve_model_source(config.model)
    is_encoder = source.kind == "hf" and is_encoder_checkpoint(source.path)
    task = config.task_for(is_encoder)
    if is_encoder:
        read_encoder_config(source.path)
        read_sentence_transformers(source.path)
        if config.tensor_parallel_size != 1 or config.num_processes != 1:
            raise ConfigError("an embedding (encoder) model runs on one device: tensor_parallel_size and "
                              "num_processes must be 1")
        return task
    model_config, _ = read_model_config(source)
    check_tensor_parallel(model_config, config.tensor_parallel_size, len(jax.devices()))
    return task


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


def watch_engine(engine: AsyncEngine | AsyncEmbeddingEngine, server: uvicorn.Server, config: ServeConfig) -> None:
    """Runs beside the server: says "ready", starts the stats log, and stops the server when the
    engine fails to start or its loop dies (the process then exits non-zero)."""
    from jaxserve.engine.async_engine import EngineDeadError, EngineState
    from jaxserve.engine.stats_logger import StatsLogger

    try:
        engine.wait_ready()
    except EngineDeadError:
        server.should_exit = True
        return
    logger.info("ready: serving %s on http://%s:%d", config.model_name, config.host, config.port)
    if not config.disable_log_stats:
        StatsLogger(engine).start()
    engine.join()
    if engine.state is EngineState.DEAD:
        server.should_exit = True


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(cli_argv(sys.argv[1:] if argv is None else argv))
        resolve_model_source(config.model)
    except (ConfigError, ModelNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    setup_runtime(config)
    from jaxserve.engine.multihost import initialize, shutdown

    initialize(config.num_processes, config.process_id, config.coordinator_address)
    try:
        task = preflight(config)
    except ValueError as e:  # TensorParallelError, unsupported architecture, bad checkpoint config
        print(f"error: {e}", file=sys.stderr)
        return 2

    import uvicorn

    from jaxserve.engine.async_engine import EngineState
    from jaxserve.engine.llm_engine import LLMEngine
    from jaxserve.server.app import build_app

    if config.process_id != 0:  # a follower: same weights and compiled steps, no HTTP, no scheduler
        steps = LLMEngine(config).runner.follow()
        logger.info("process %d: leader stopped after %d steps", config.process_id, steps)
        shutdown()
        return 0
    engine = make_engine(config, task)

    def stop() -> None:
        engine.shutdown()  # also releases the followers of a multi-host launch
        shutdown()

    app = build_app(config, engine, on_shutdown=stop)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.log_level, timeout_graceful_shutdown=5,
        access_log=not config.disable_uvicorn_access_log,
    ))
    logging.getLogger("uvicorn.access").addFilter(_drop_health_polls)  # after uvicorn configured logging
    threading.Thread(target=watch_engine, args=(engine, server, config), name="jaxserve-watch", daemon=True).start()
    logger.info("serving %s on http://%s:%d (loading in the background)", config.model_name, config.host, config.port)
    engine.start()
    server.run()
    if engine.state in (EngineState.FAILED, EngineState.DEAD):
        print(f"error: {engine.error}", file=sys.stderr)
        return 1
    return 0


def make_engine(config: ServeConfig, task: str) -> AsyncEngine | AsyncEmbeddingEngine:
    """The thread-hosted engine for ``task`` (not started)."""
    if task == "embed":
        from jaxserve.engine.async_embedding import AsyncEmbeddingEngine
        from jaxserve.engine.embedding_engine import EmbeddingEngine

        return AsyncEmbeddingEngine(lambda: EmbeddingEngine(config), log_requests=config.enable_log_requests)
    from jaxserve.engine.async_engine import AsyncEngine
    from jaxserve.engine.llm_engine import LLMEngine

    return AsyncEngine(
        lambda: LLMEngine(config), max_queue_size=config.max_queue_size, log_requests=config.enable_log_requests
    )


def _drop_health_polls(record: logging.LogRecord) -> bool:
    """Access-log filter: ``/health`` polls (a supervisor's, every second) are not logged."""
    args = record.args
    return not (isinstance(args, tuple) and len(args) >= 3 and args[2] == "/health")


if __name__ == "__main__":
    sys.exit(main())
