"""Build a BERT-family encoder from an HF safetensors directory (one device, no sharding).

The module is built abstractly, then each state leaf is read from the checkpoint tensor its path
names (``_HF_NAMES``); a missing or mis-shaped tensor is an error naming it. Encoders are small
(all-MiniLM-L6-v2: 22.7 M parameters), so tensors are read whole.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from transformers import AutoConfig

from jaxserve.models.bert import BertConfig, BertModel, bert_config_from_hf
from jaxserve.weights.abstract_model import state_path
from jaxserve.weights.safetensors_reader import safetensors_files

# Our layer attribute -> HF's name under ``encoder.layer.{i}.``
_LAYER_NAMES = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attention_output": "attention.output.dense", "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense", "output": "output.dense", "output_norm": "output.LayerNorm",
}
_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "weight": "weight", "bias": "bias"}


@dataclasses.dataclass
class LoadedEncoder:
    config: BertConfig
    graphdef: nnx.GraphDef
    state: nnx.State


def is_encoder_checkpoint(directory: Path) -> bool:
    """Whether ``directory``'s config.json names an encoder architecture (BertModel)."""
    from jaxserve.models.bert import ENCODER_ARCHITECTURES

    if not (directory / "config.json").is_file():
        return False
    hf = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    return any(a in ENCODER_ARCHITECTURES for a in (getattr(hf, "architectures", None) or []))


def read_encoder_config(directory: Path, overrides: dict[str, Any] | None = None) -> BertConfig:
    """The encoder's config, with ``--hf-overrides`` applied to config.json's keys first."""
    hf = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    for key, value in (overrides or {}).items():
        setattr(hf, key, value)
    return bert_config_from_hf(hf)


def hf_name(path: tuple) -> str:
    """The checkpoint tensor of a state path: ``layers/0/query/kernel`` -> ``encoder.layer.0.attention.self.query.weight``."""
    if path[0] == "layers":
        _, i, module, leaf = path
        return f"encoder.layer.{i}.{_LAYER_NAMES[module]}.{_LEAF_NAMES[leaf]}"
    if path[0] == "embeddings":
        return f"embeddings.{path[1]}.{_LEAF_NAMES[path[2]]}"
    raise KeyError(f"no checkpoint name for state path {'/'.join(map(str, path))}")


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for f in safetensors_files(directory):
        with safe_open(str(f), framework="numpy") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[re.sub(r"^bert\.", "", name)] = fh.get_tensor(name)
    return tensors


def load_encoder(directory: Path, dtype: jnp.dtype, overrides: dict[str, Any] | None = None) -> LoadedEncoder:
    """The encoder of ``directory`` with its weights in ``dtype`` on the default device."""
    cfg = read_encoder_config(directory, overrides)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: BertModel(cfg, dtype=dtype, rngs=nnx.Rngs(0))))
    tensors = _read_tensors(directory)

    def value(p: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = hf_name(state_path(p))
        if name not in tensors:
            raise ValueError(f"{directory}: checkpoint tensor {name!r} is missing")
        t = tensors[name]
        if t.shape != leaf.shape:
            raise ValueError(f"{directory}: tensor {name!r} has shape {t.shape}, expected {leaf.shape}")
        return jnp.asarray(t, dtype=leaf.dtype)

    state = jax.tree_util.tree_map_with_path(value, abstract)
    return LoadedEncoder(cfg, graphdef, state)
