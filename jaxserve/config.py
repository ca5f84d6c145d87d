"""The one configuration definition: YAML keys, CLI flags (vLLM's names) and defaults.

Every field of ``ServeConfig`` is a YAML key (``max_model_len`` or ``max-model-len``) and a CLI
flag (``--max-model-len``); ``config_loading`` maps YAML and flags onto it (the CLI overrides the
YAML, which overrides the defaults). Values are validated once in ``__post_init__`` with errors
naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from jaxserve.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


def _field(default: Any, help: str, *, choices: tuple | None = None, factory: Any = None) -> Any:  # noqa: A002
    meta = {"help": help, "choices": choices}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Model, engine and server settings for one ``jaxserve`` process."""

    # --- model -----------------------------------------------------------------------------
    model: str = _field("", "Local HF checkpoint directory, .gguf file, or a hub id already in the local HF cache.")
    tokenizer: str | None = _field(None, "Tokenizer directory (default: the model's).")
    served_model_name: list[str] | None = _field(
        None, "Name(s) the API accepts in 'model'; the first is reported (default: --model)."
    )
    dtype: str = _field(
        "auto",
        "Weight (and KV-cache) dtype; auto = the checkpoint's 16-bit dtype on accelerators; on CPU "
        "bfloat16 where the CPU has native bf16 dot products, else float32 (CPU activations stay float32).",
        choices=("auto", "bfloat16", "float16", "float32"),
    )
    load_format: str = _field(
        "auto",
        "auto = read the checkpoint's weights; dummy = random weights of the checkpoint's shapes (only its "
        "config and tokenizer are read), for benchmarks, like vLLM's --load-format dummy.",
        choices=("auto", "dummy"),
    )
    max_model_len: int | None = _field(None, "Maximum prompt + output tokens (default: the model's context length).")
    seed: int = _field(0, "Seed for requests that do not set one.")
    task: str = _field(
        "auto", "What the model serves: generate (chat and completions) or embed (/v1/embeddings; a decoder pools its "
        "token states as --pooling says); auto = embed "
        "for an encoder checkpoint (BertModel), generate otherwise.", choices=("auto", "generate", "embed"),
    )
    runner: str = _field(
        "auto", "vLLM's spelling of the task: pooling = --task embed, generate = --task generate.",
        choices=("auto", "generate", "pooling"),
    )
    convert: str = _field("auto", "vLLM's --convert: embed = --task embed.", choices=("auto", "none", "embed"))
    pooling: str = _field(
        "auto", "A decoder embedder's pooling (then L2-normalised, like Qwen3-Embedding): last or mean token state; "
        "auto = the checkpoint's sentence-transformers modules.json if it has one, else last.",
        choices=("auto", "last", "mean"),
    )
    hf_overrides: dict[str, Any] | None = _field(
        None, "JSON object of config.json keys to override, e.g. '{\"matryoshka_dimensions\": [256, 128]}' "
        "(encoder models only so far).",
    )
    # --- engine ----------------------------------------------------------------------------
    block_size: int = _field(16, "Tokens per KV-cache block (a power of two, at most 256).")
    max_num_seqs: int = _field(64, "Maximum sequences in one step.")
    max_num_batched_tokens: int = _field(512, "Token budget of one step (prefill chunks + decodes).")
    gpu_memory_utilization: float = _field(
        0.9, "Fraction of accelerator memory jaxserve may use (weights + KV cache + activations)."
    )
    kv_cache_memory_gib: float = _field(2.0, "KV-cache size in GiB on CPU (accelerators use --gpu-memory-utilization).")
    num_kv_blocks: int | None = _field(None, "Force the number of KV-cache blocks (overrides the memory budget).")
    enable_prefix_caching: bool = _field(True, "Reuse the KV blocks of shared prompt prefixes across requests.")
    async_scheduling: bool = _field(
        True, "Prepare step N+1 on the host while the device runs step N (sampled ids stay on device)."
    )
    tensor_parallel_size: int = _field(1, "Devices to shard the model over (tensor parallelism).")
    num_processes: int = _field(1, "Processes (hosts) in a multi-host launch (jax.distributed).")
    process_id: int = _field(0, "This process's rank; 0 serves HTTP and drives the schedule.")
    coordinator_address: str | None = _field(None, "host:port of process 0's jax.distributed coordinator.")
    attention_backend: str = _field(
        "auto",
        "Attention implementation: auto = Pallas kernel on CUDA GPUs, jax's TPU kernel on TPUs, on CPUs the "
        "pure-jnp reference with large decode batches grouped by context length, the reference elsewhere; "
        "pallas off-GPU runs the kernel in interpret mode.",
        choices=("auto", "pallas", "reference"),
    )
    compilation_cache_dir: str | None = _field(
        str(Path.home() / ".cache" / "jaxserve" / "xla"),
        "Persistent XLA compilation cache directory ('' disables it).",
    )
    background_compile: bool = _field(
        False, "Become ready once the largest step shape of each family is compiled; compile the others in a "
        "background thread while serving (smaller batches run padded meanwhile; a logits-processor or grammar "
        "step waits for its first executable). One process only.",
    )
    # --- chat: templates, tool calls, reasoning --------------------------------------------------
    chat_template: str | None = _field(
        None, "Chat template to use instead of the tokenizer's: a Jinja file, a shipped one by bare name "
        "(hermes_tool_chat.jinja: Qwen2.5-style tools for models such as SmolLM2) or the template text itself.",
    )
    enable_auto_tool_choice: bool = _field(
        False, "Let the model decide when to call tools (tool_choice 'auto', the default when tools are sent); "
        "needs --tool-call-parser."
    )
    tool_call_parser: str | None = _field(
        None, "The model's tool-call format: hermes (Qwen2.5/Qwen3: <tool_call>{...}</tool_call>) or llama3_json "
        "(Llama 3.x: {\"name\": ..., \"parameters\": ...}); required for any tool_choice but 'none'.",
        choices=(None, "hermes", "llama3_json"),
    )
    reasoning_parser: str | None = _field(
        None, "Split the model's thinking into reasoning_content: qwen3 (<think>...</think> at the start of the "
        "output) or deepseek_r1 (the output is reasoning up to </think>; the template opened <think>).",
        choices=(None, "qwen3", "deepseek_r1"),
    )
    # --- LoRA adapters (vLLM's flags) --------------------------------------------------------
    enable_lora: bool = _field(False, "Serve LoRA adapters on the base model; a request selects one by its 'model'.")
    lora_modules: list[str] | None = _field(
        None, "Adapters to serve: name=path (PEFT adapter directories), or JSON '{\"name\": ..., \"path\": ..., "
        "\"base_model_name\": ...}'; several allowed.",
    )
    max_loras: int = _field(1, "Adapters resident on the device at once (one step mixes at most this many).")
    max_lora_rank: int = _field(16, "Largest adapter rank accepted; every slot is padded to it.")
    max_cpu_loras: int | None = _field(None, "Adapters kept in host memory (default: --max-loras); others are re-read.")
    enable_lora_runtime_updates: bool = _field(
        False, "Allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (also VLLM_ALLOW_RUNTIME_LORA_UPDATING=1)."
    )
    # --- server ----------------------------------------------------------------------------
    host: str = _field("127.0.0.1", "Address to listen on.")
    port: int = _field(8000, "Port to listen on.")
    ssl_keyfile: str | None = _field(None, "TLS private key file (PEM); with --ssl-certfile the server speaks HTTPS.")
    ssl_certfile: str | None = _field(None, "TLS certificate file (PEM), with --ssl-keyfile.")
    api_key: list[str] | None = _field(
        None, "API key(s) clients must send as 'Authorization: Bearer <key>' (also $JAXSERVE_API_KEY)."
    )
    allowed_origins: list[str] = _field(None, "CORS allowed origins, a JSON list.", factory=list)
    allowed_methods: list[str] = _field(None, "CORS allowed methods, a JSON list.", factory=lambda: ["*"])
    allowed_headers: list[str] = _field(None, "CORS allowed headers, a JSON list.", factory=lambda: ["*"])
    allow_credentials: bool = _field(False, "CORS: allow credentials.")
    max_queue_size: int | None = _field(
        None, "Most requests allowed to wait for the engine; more get 503 (default: unbounded)."
    )
    max_request_body_bytes: int = _field(32 << 20, "Largest accepted request body; larger ones get 413.")
    max_undelivered_chunks: int = _field(
        1000, "Outputs a stream may have waiting for a slow client; one that falls this far behind is dropped "
        "and its request aborted (the engine never waits for a reader)."
    )
    # --- request caps (checked once, in server/caps.py, before a request reaches the engine) ---
    max_logprobs: int = _field(20, "Most top logprobs a request may ask for per token (vLLM's flag; at most 20, "
                               "the width the sampler computes).")
    max_n: int = _field(128, "Most choices (n) one request may ask for.")
    max_stop_strings: int = _field(64, "Most stop strings one request may give.")
    max_logit_bias: int = _field(300, "Most logit_bias entries one request may give (OpenAI's limit, also the "
                                 "most the compiled sampler holds).")
    max_messages: int = _field(2048, "Most chat messages one request may give.")
    max_prompt_chars: int = _field(
        1 << 20, "Most characters of text one request may give to tokenize (messages, prompts, inputs), checked "
        "before tokenizing; token-id prompts are limited by --max-model-len.",
    )
    shutdown_timeout: float = _field(
        30.0, "On SIGTERM or Ctrl-C: seconds running requests may take to finish (new ones get 503) before the "
        "rest are aborted with an error; the process then exits 0."
    )
    log_level: str = _field("info", "Log level.", choices=("debug", "info", "warning", "error"))
    enable_log_requests: bool = _field(
        False, "Log each request as it reaches the engine: id, prompt tokens, sampling parameters "
        "(--disable-log-requests, vLLM's older spelling, is the default)."
    )
    disable_log_stats: bool = _field(
        False, "Do not log throughput, running/waiting requests and KV-cache usage every 10 s while busy."
    )
    disable_uvicorn_access_log: bool = _field(
        False, "No HTTP access log at all (/health polls are never logged)."
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(
                    f"{f.name}: {value!r} is not allowed; allowed values: {', '.join(map(str, choices))}"
                )
        _positive(self, "max_num_seqs", "max_num_batched_tokens", "port", "block_size")
        if self.block_size & (self.block_size - 1) or self.block_size > 256:
            raise ConfigError(f"block_size must be a power of two between 1 and 256, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be a positive integer, got {self.max_model_len}")
        if self.max_queue_size is not None and self.max_queue_size < 0:
            raise ConfigError(f"max_queue_size must be >= 0, got {self.max_queue_size}")
        if self.max_undelivered_chunks < 1:
            raise ConfigError(f"max_undelivered_chunks must be a positive integer, got {self.max_undelivered_chunks}")
        _positive(self, "max_n", "max_stop_strings", "max_messages", "max_prompt_chars")
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ConfigError(f"max_logprobs must be in [0, {MAX_LOGPROBS}], got {self.max_logprobs}")
        if not 0 <= self.max_logit_bias <= MAX_LOGIT_BIAS:
            raise ConfigError(f"max_logit_bias must be in [0, {MAX_LOGIT_BIAS}], got {self.max_logit_bias}")
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ConfigError("ssl_keyfile and ssl_certfile: give both (HTTPS) or neither")
        for name in ("ssl_keyfile", "ssl_certfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).expanduser().is_file():
                raise ConfigError(f"{name}: {path} is not a file")
        if self.shutdown_timeout < 0:
            raise ConfigError(f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout}")
        if self.max_request_body_bytes < 1024:
            raise ConfigError(f"max_request_body_bytes must be at least 1024, got {self.max_request_body_bytes}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ConfigError(f"num_kv_blocks must be at least 2, got {self.num_kv_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_gib <= 0:
            raise ConfigError(f"kv_cache_memory_gib must be positive, got {self.kv_cache_memory_gib}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs ({self.max_num_seqs})"
            )
        _positive(self, "tensor_parallel_size", "num_processes")
        if not 0 <= self.process_id < self.num_processes:
            raise ConfigError(f"process_id must be in [0, {self.num_processes}), got {self.process_id}")
        if self.num_processes > 1 and not self.coordinator_address:
            raise ConfigError("coordinator_address: required when num_processes > 1 (host:port of process 0)")
        if not self.model:
            raise ConfigError("model: required (a local checkpoint directory or .gguf file)")
        self._check_lora()
        self.requested_task  # noqa: B018 - raises on conflicting task/runner/convert
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ConfigError("enable_auto_tool_choice: needs --tool-call-parser (hermes or llama3_json)")
        self.chat_template_text  # noqa: B018 - raises when the file cannot be read

    def _check_lora(self) -> None:
        _positive(self, "max_loras", "max_lora_rank")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ConfigError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        if self.lora_modules and not self.enable_lora:
            raise ConfigError("lora_modules: LoRA adapters need --enable-lora")
        if self.enable_lora_runtime_updates and not self.enable_lora:
            raise ConfigError("enable_lora_runtime_updates: LoRA adapters need --enable-lora")
        names = [name for name, _ in self.lora_module_paths]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ConfigError(f"lora_modules: the adapter name {dup!r} is given twice")

    @property
    def runtime_lora_updates(self) -> bool:
        """--enable-lora-runtime-updates, or vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 (with --enable-lora)."""
        env = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true")
        return self.enable_lora and (self.enable_lora_runtime_updates or env)

    @property
    def cpu_loras(self) -> int:
        """Adapters kept in host memory: ``--max-cpu-loras``, by default ``--max-loras``."""
        return self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras

    @property
    def lora_module_paths(self) -> list[tuple[str, str]]:
        """``lora_modules`` as (name, path) pairs (``name=path`` or vLLM's JSON object form)."""
        pairs = []
        for item in self.lora_modules or []:
            if item.lstrip().startswith("{"):
                try:
                    obj = json.loads(item)
                    pairs.append((str(obj["name"]), str(obj["path"])))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ConfigError(f"lora_modules: {item!r} is not a JSON object with 'name' and 'path'") from None
            elif "=" in item and item.split("=", 1)[0] and item.split("=", 1)[1]:
                pairs.append(tuple(item.split("=", 1)))
            else:
                raise ConfigError(f"lora_modules: {item!r} is not name=path or a JSON object")
        return pairs

    @property
    def requested_task(self) -> str:
        """``task``, ``runner`` and ``convert`` as one of auto / generate / embed."""
        asked = {"task": self.task, "runner": {"pooling": "embed"}.get(self.runner, self.runner),
                 "convert": {"none": "auto"}.get(self.convert, self.convert)}
        named = {k: v for k, v in asked.items() if v != "auto"}
        if len(set(named.values())) > 1:
            raise ConfigError("conflicting tasks: " + ", ".join(f"--{k} {getattr(self, k)}" for k in named))
        return next(iter(named.values()), "auto")

    def task_for(self, is_encoder: bool) -> str:
        """The served task for a checkpoint that is (or is not) an encoder; ConfigError if it cannot be."""
        task = self.requested_task
        if task == "auto":
            task = "embed" if is_encoder else "generate"
        if is_encoder and task == "generate":
            raise ConfigError(f"task: {self.model} is an encoder (embedding) model; it cannot serve task 'generate'")
        if task == "embed" and self.enable_lora:
            raise ConfigError("enable_lora: LoRA adapters are served on generate models only")
        if self.pooling != "auto" and (is_encoder or task != "embed"):
            raise ConfigError(f"pooling: --pooling {self.pooling} applies only to a decoder served with --task embed "
                              "(an encoder's pooling is read from its modules.json)")
        return task

    @property
    def chat_template_text(self) -> str | None:
        """``chat_template`` as template text: inline Jinja, a file, or a shipped template by bare name."""
        value = self.chat_template
        if value is None or "{{" in value or "{%" in value:
            return value
        path = Path(value).expanduser()
        if not path.is_file() and path.name == value:
            shipped = resources.files("jaxserve.configs") / value
            if shipped.is_file():
                return shipped.read_text(encoding="utf-8")
        try:
            return path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"chat_template: cannot read {value!r} ({e.strerror or e}); give a Jinja file, "
                              "a shipped template (hermes_tool_chat.jinja) or the template text") from None

    @property
    def model_name(self) -> str:
        """The name reported in responses."""
        return self.served_model_name[0] if self.served_model_name else self.model

    @property
    def accepted_model_names(self) -> list[str]:
        """Every name the API accepts in ``model``."""
        return list(self.served_model_name) if self.served_model_name else [self.model]


def _positive(cfg: ServeConfig, *names: str) -> None:
    """ConfigError naming the first of ``names`` that is not a positive int."""
    for n in names:
        v = getattr(cfg, n)
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{n} must be a positive integer, got {v!r}")
