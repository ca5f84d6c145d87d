"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` -> host matrices.

Supported: ``r``, ``lora_alpha``, ``use_rslora`` (scaling ``alpha / sqrt(r)`` instead of
``alpha / r``), ``target_modules`` among q/k/v/o_proj and gate/up/down_proj (a list, or PEFT's
regex string matched against module names), ``bias: none``. Anything else that changes the
result (DoRA, biases, ``modules_to_save``, per-module rank or alpha patterns, ``fan_in_fan_out``,
LM head or embedding targets, rank above ``--max-lora-rank``) is a ``LoraAdapterError`` naming the
field, never silently ignored. The scaling is folded into B here, so the device computes
``B (A x)`` only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
from safetensors import safe_open

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_EMBEDDING_OR_HEAD = ("lm_head", "embed_tokens", "embed", "wte", "output")
_TENSOR = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class LoraAdapterError(ValueError):
    """An adapter cannot be served; the message names the offending field (or file)."""


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """One adapter on the host: ``weights[(layer, module)] = (A [r, in], B [out, r] · scaling)``, float32."""

    path: Path
    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]

    @property
    def modules(self) -> set[str]:
        return {m for _, m in self.weights}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def _fail(path: Path, field: str, message: str) -> LoraAdapterError:
    return LoraAdapterError(f"LoRA adapter {path}: {field}: {message}")


def read_adapter_config(path: Path, max_rank: int) -> tuple[int, float, str | list[str]]:
    """Validate ``adapter_config.json``; returns (rank, scaling, target_modules)."""
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise LoraAdapterError(f"LoRA adapter {path}: no adapter_config.json (expected a PEFT adapter directory)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoraAdapterError(f"LoRA adapter {path}: adapter_config.json is not valid JSON: {e}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _fail(path, "peft_type", f"{cfg['peft_type']!r} is not supported (only LORA)")
    checks = {
        "use_dora": (False, "DoRA adapters are not supported"),
        "bias": ("none", "only bias 'none' is supported"),
        "fan_in_fan_out": (False, "fan_in_fan_out weights are not supported"),
    }
    for field, (ok, why) in checks.items():
        if cfg.get(field, ok) not in (ok, None):
            raise _fail(path, field, f"{cfg[field]!r}: {why}")
    for field in ("modules_to_save", "rank_pattern", "alpha_pattern", "layer_replication", "trainable_token_indices"):
        if cfg.get(field):
            raise _fail(path, field, "is not supported (must be empty)")
    rank = cfg.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise _fail(path, "r", f"must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise _fail(path, "r", f"rank {rank} exceeds --max-lora-rank {max_rank}")
    alpha = cfg.get("lora_alpha", 8)
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        bad = [t for t in targets if t not in MODULES]
        if bad:
            kind = "LM head / embedding targets are" if set(bad) & set(_EMBEDDING_OR_HEAD) else "modules are"
            raise _fail(path, "target_modules", f"{bad}: {kind} not supported (supported: {', '.join(MODULES)})")
    elif not isinstance(targets, str):
        raise _fail(path, "target_modules", f"expected a list of module names or a regex, got {targets!r}")
    return rank, float(scaling), targets


def _weights_file(path: Path) -> Path:
    f = path / "adapter_model.safetensors"
    if not f.is_file():
        raise LoraAdapterError(f"LoRA adapter {path}: no adapter_model.safetensors (only safetensors adapters are read)")
    return f


def _read_tensors(path: Path) -> dict[tuple[int, str, str], np.ndarray]:
    """(layer, module, 'A' | 'B') -> float32 matrix; other LoRA tensors are errors naming them."""
    out = {}
    with safe_open(str(_weights_file(path)), framework="numpy") as fh:
        for name in fh.keys():
            m = _TENSOR.search(name)
            if m is None or m.group(2) not in MODULES:
                raise _fail(path, "adapter_model.safetensors",
                            f"tensor {name!r} targets a module that is not supported (supported: {', '.join(MODULES)})")
            out[(int(m.group(1)), m.group(2), m.group(3))] = np.asarray(fh.get_tensor(name), np.float32)
    return out


def load_adapter(path: str | Path, max_rank: int, num_layers: int) -> LoraAdapter:
    """Read and validate one PEFT adapter directory (``LoraAdapterError`` names what is wrong)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise LoraAdapterError(f"LoRA adapter {path}: not a directory")
    rank, scaling, targets = read_adapter_config(path, max_rank)
    tensors = _read_tensors(path)
    weights = {}
    for layer, module in sorted({(layer, mod) for layer, mod, _ in tensors}):
        if isinstance(targets, list) and module not in targets:
            raise _fail(path, "target_modules", f"the weights have {module} but target_modules does not list it")
        if layer >= num_layers:
            raise _fail(path, "adapter_model.safetensors", f"layer {layer} but the model has {num_layers} layers")
        a, b = tensors.get((layer, module, "A")), tensors.get((layer, module, "B"))
        if a is None or b is None:
            raise _fail(path, "adapter_model.safetensors", f"layer {layer} {module} lacks lora_A or lora_B")
        if a.shape[0] != rank or b.shape[1] != rank:
            raise _fail(path, "r", f"layer {layer} {module}: lora_A {a.shape} / lora_B {b.shape} do not have rank {rank}")
        weights[(layer, module)] = (a, b * np.float32(scaling))
    if not weights:
        raise _fail(path, "adapter_model.safetensors", "holds no LoRA tensors")
    return LoraAdapter(path, rank, scaling, weights)
