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
    import jax

    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
        resolve_model_source(config.model)
    except (ConfigError, ModelNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    setup_runtime(config)

    import uvicorn

    from jaxserve.engine.async_engine import AsyncEngine
    from jaxserve.engine.llm_engine import LLMEngine
    from jaxserve.server.app import build_app

    engine = AsyncEngine(lambda: LLMEngine(config), max_queue_size=config.max_queue_size)
    engine.start()
    app = build_app(config, engine)
    logger.info("serving %s on http://%s:%d (loading in the background)", config.model_name, config.host, config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level, timeout_graceful_shutdown=5)
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
