"""LoRA adapters for tests: random PEFT adapters written by ``peft`` (torch), or by hand (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# name -> (target modules, rank, alpha, use_rslora): the three target sets the tests compare against HF.
ADAPTERS = {
    "attn": (ATTENTION, 4, 16, False),
    "mlp": (MLP, 8, 8, True),
    "all": (ATTENTION + MLP, 6, 12, False),
}


def write_peft_adapter(hf_model, directory: Path, targets: list[str], rank: int, alpha: float, rslora: bool,
                       seed: int):
    """A PEFT LoRA adapter of ``hf_model`` with random A *and* B (PEFT starts B at zero, which would
    make the adapter a no-op no test could catch); returns the PeftModel (the reference)."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=targets, lora_dropout=0.0,
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(hf_model), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.eval()
    model.save_pretrained(str(directory))
    return model


def write_peft_adapters(hf_model, root: Path, seed: int = 0) -> dict[str, tuple[Path, object]]:
    """``ADAPTERS`` written under ``root``: name -> (directory, PeftModel)."""
    out = {}
    for i, (name, (targets, rank, alpha, rslora)) in enumerate(ADAPTERS.items()):
        d = root / name
        out[name] = (d, write_peft_adapter(hf_model, d, targets, rank, alpha, rslora, seed + i))
    return out


def write_adapter_by_hand(directory: Path, dims: dict[str, tuple[int, int]], num_layers: int, *, rank: int,
                          alpha: float, seed: int, config: dict | None = None,
                          prefix: str = "base_model.model.model.layers") -> dict:
    """A PEFT-format adapter without torch: ``dims`` maps module -> (in, out). Returns the tensors
    as (layer, module) -> (A [r, in], B [out, r]) float32 (unscaled)."""
    from safetensors.numpy import save_file

    rng = np.random.RandomState(seed)
    tensors, weights = {}, {}
    for layer in range(num_layers):
        for module, (d_in, d_out) in dims.items():
            kind = "self_attn" if module in ATTENTION else "mlp"
            a = (rng.randn(rank, d_in) * 0.1).astype(np.float32)
            b = (rng.randn(d_out, rank) * 0.1).astype(np.float32)
            tensors[f"{prefix}.{layer}.{kind}.{module}.lora_A.weight"] = a
            tensors[f"{prefix}.{layer}.{kind}.{module}.lora_B.weight"] = b
            weights[(layer, module)] = (a, b)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(dims), "bias": "none",
           "use_dora": False, "use_rslora": False, **(config or {})}
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    return weights


def write_shift_adapter(directory: Path, shift: int, **config) -> None:
    """A hand-checkable adapter of the lookback model (``tests.helpers.write_lookback_checkpoint``): its
    o_proj delta moves the attention output's residue one-hot from ``r`` to ``r + shift`` (mod 16),
    so the model reads the previous token's residue as ``prev + shift`` (``shift_continue``)."""
    from safetensors.numpy import save_file

    from tests.helpers import LOOKBACK_PERIOD, TINY_VOCAB, _lookback_hidden

    period, attn = LOOKBACK_PERIOD, TINY_VOCAB + 1
    a = np.zeros((period, 4 * 32), np.float32)  # o_proj input: 4 heads x 32; head 0's dims 0..15 hold the residue
    a[np.arange(period), np.arange(period)] = 1.0
    b = np.zeros((_lookback_hidden(TINY_VOCAB), period), np.float32)
    b[attn + (np.arange(period) + shift) % period, np.arange(period)] += 1.0
    b[attn + np.arange(period), np.arange(period)] -= 1.0
    directory.mkdir(parents=True, exist_ok=True)
    prefix = "base_model.model.model.layers.0.self_attn.o_proj"
    save_file({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}, str(directory / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": period, "lora_alpha": period, "target_modules": ["o_proj"], "bias": "none",
           "use_dora": False, "use_rslora": False, **config}
    (directory / "adapter_config.json").write_text(json.dumps(cfg))


def shift_continue(tokens: list[int], n: int, shift: int) -> list[int]:
    """The lookback model's greedy continuation under ``write_shift_adapter(shift)``."""
    from tests.helpers import lookback_next

    seq = list(tokens)
    for _ in range(n):
        last, prev = seq[-1], seq[-2] if len(seq) > 1 else seq[-1]
        seq.append(lookback_next(last, prev + shift))
    return seq[len(tokens):]
