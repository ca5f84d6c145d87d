"""LoRA adapters over HTTP: runtime ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``
(vLLM's endpoints, registered only with ``--enable-lora-runtime-updates`` or
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``; the API key guards them like every route but /health).

Unloading an adapter that queued or running requests use is refused with 409 (the client retries
once they end): waiting could hold the request open for as long as the longest generation.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.llm_engine import LoraInUseError
from jaxserve.engine.lora_slots import LoraNotFoundError
from jaxserve.server.errors import OpenAIError
from jaxserve.server.protocol import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from jaxserve.weights.lora import LoraAdapterError

EngineFor = Callable[[str | None], AsyncEngine]  # the base model's engine a request names (or the default)


def add_lora_routes(app: FastAPI, engine_for: EngineFor, taken: Callable[[str], bool]) -> None:
    """``taken(name)``: the name is already a served model or adapter (a new adapter may not reuse it)."""

    @app.post("/v1/load_lora_adapter")
    async def load(req: LoadLoraAdapterRequest) -> PlainTextResponse:
        """``POST /v1/load_lora_adapter``: load an adapter under a new name (400 if taken or unreadable)."""
        engine = engine_for(req.model)
        if taken(req.lora_name):
            raise OpenAIError(400, f"The LoRA adapter name `{req.lora_name}` is already in use.", param="lora_name")
        try:
            await engine.load_lora(req.lora_name, req.lora_path)
        except (LoraAdapterError, ValueError, OSError) as e:
            raise OpenAIError(400, str(e), param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload(req: UnloadLoraAdapterRequest) -> PlainTextResponse:
        """``POST /v1/unload_lora_adapter``: 404 for an unknown adapter, 409 while requests still use it."""
        engine = engine_for(req.model)
        try:
            await engine.unload_lora(req.lora_name)
        except LoraNotFoundError:
            raise OpenAIError(404, f"The LoRA adapter `{req.lora_name}` cannot be found.", param="lora_name",
                              type="NotFoundError") from None
        except LoraInUseError as e:
            raise OpenAIError(409, str(e), param="lora_name", type="ConflictError") from None
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
