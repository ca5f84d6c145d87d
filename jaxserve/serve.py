"""``python -m jaxserve.serve --config configs/smollm2.yaml``: the OpenAI-compatible server.

The HTTP server starts at once (``/health`` answers 503 while the model loads and compiles);
configuration and model-location errors end the process with one sentence before that.
"""

from __future__ import annotations

import logging
import sys

from jaxserve.config import ConfigError, ServeConfig, load_config
from jaxserve.weights.source import ModelNotFoundError, resolve_model_source

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


def preflight(config: ServeConfig) -> None:
    """Checks that need the model's config but not its weights: location, architecture, TP size."""
    import jax

    from jaxserve.sharding import check_tensor_parallel
    from jaxserve.weights.loader import read_model_config

    source = resolve_model_source(config.model)
    model_config, _ = read_model_config(source)
    check_tensor_parallel(model_config, config.tensor_parallel_size, len(jax.devices()))


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
        resolve_model_source(config.model)
    except (ConfigError, ModelNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    setup_runtime(config)
    from jaxserve.engine.multihost import initialize, shutdown

    initialize(config.num_processes, config.process_id, config.coordinator_address)
    try:
        preflight(config)
    except ValueError as e:  # TensorParallelError, unsupported architecture, bad checkpoint config
        print(f"error: {e}", file=sys.stderr)
        return 2

    import uvicorn

    from jaxserve.engine.async_engine import AsyncEngine
    from jaxserve.engine.llm_engine import LLMEngine
    from jaxserve.server.app import build_app

    if config.process_id != 0:  # a follower: same weights and compiled steps, no HTTP, no scheduler
        steps = LLMEngine(config).runner.follow()
        logger.info("process %d: leader stopped after %d steps", config.process_id, steps)
        shutdown()
        return 0
    engine = AsyncEngine(lambda: LLMEngine(config), max_queue_size=config.max_queue_size)
    engine.start()
    def stop() -> None:
        engine.shutdown()  # also releases the followers of a multi-host launch
        shutdown()

    app = build_app(config, engine, on_shutdown=stop)
    logger.info("serving %s on http://%s:%d (loading in the background)", config.model_name, config.host, config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
