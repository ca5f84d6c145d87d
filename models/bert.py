"""BERT-family encoder (HF ``BertModel``: all-MiniLM-L6-v2 and kin) in Flax NNX, plus pooling.

Post-LN layers, learned absolute positions, token types, exact (erf) GELU and a key padding mask:
every row of a padded batch equals the same sentence run alone. No KV cache: a batch is
``[B, L]`` token ids padded to a length bucket, and the output is one pooled vector per row.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.models.layers import Embedding, Linear

POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len", "lasttoken")


@dataclasses.dataclass(frozen=True)
class PoolingConfig:
    """How token states become one vector: ``mode`` (one of POOLING_MODES), then optional L2 norm."""

    mode: str
    normalize: bool

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ValueError(f"pooling mode {self.mode!r} is not supported; supported: {', '.join(POOLING_MODES)}")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Encoder hyper-parameters read from an HF ``BertConfig``."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int | None = None
    matryoshka_dimensions: tuple[int, ...] | None = None  # None: `dimensions` is refused

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_heads}")


ENCODER_ARCHITECTURES = ("BertModel",)


def bert_config_from_hf(hf: Any) -> BertConfig:
    """Translate a transformers ``BertConfig``; ValueError for settings this model does not implement."""
    archs = list(getattr(hf, "architectures", None) or [])
    arch = archs[0] if archs else ""
    if arch not in ENCODER_ARCHITECTURES:
        raise ValueError(f"encoder architecture {arch!r} is not supported; supported: {', '.join(ENCODER_ARCHITECTURES)}")
    if getattr(hf, "hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act {hf.hidden_act!r} is not supported by the BERT encoder (only 'gelu', exact)")
    if getattr(hf, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type {hf.position_embedding_type!r} is not supported (only 'absolute')")
    dims = getattr(hf, "matryoshka_dimensions", None)
    matryoshka = tuple(int(d) for d in dims) if dims else None
    if matryoshka is None and getattr(hf, "is_matryoshka", False):
        matryoshka = ()  # any dimension up to hidden_size
    return BertConfig(
        architecture=arch, vocab_size=int(hf.vocab_size), hidden_size=int(hf.hidden_size),
        intermediate_size=int(hf.intermediate_size), num_layers=int(hf.num_hidden_layers),
        num_heads=int(hf.num_attention_heads), max_position_embeddings=int(hf.max_position_embeddings),
        type_vocab_size=int(getattr(hf, "type_vocab_size", 2)), layer_norm_eps=float(hf.layer_norm_eps),
        pad_token_id=getattr(hf, "pad_token_id", None), matryoshka_dimensions=matryoshka,
    )


class LayerNorm(nnx.Module):
    """HF LayerNorm (weight, bias), computed in float32."""

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype) -> None:
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.position_embeddings = Embedding(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, ids_BL: jax.Array) -> jax.Array:
        positions_L = jnp.arange(ids_BL.shape[1])
        x = self.word_embeddings(ids_BL) + self.position_embeddings(positions_L)[None]
        x = x + self.token_type_embeddings(jnp.zeros_like(ids_BL))  # one segment: token type 0
        return self.LayerNorm(x.astype(jnp.float32))


class BertLayer(nnx.Module):
    """Self-attention + LayerNorm, then GELU MLP + LayerNorm (post-LN); HF's parameter names."""

    def __init__(self, cfg: BertConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.num_heads = cfg.num_heads
        self.query = Linear(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.key = Linear(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.value = Linear(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.attention_output = Linear(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.attention_norm = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype)
        self.intermediate = Linear(d, f, bias=True, dtype=dtype, rngs=rngs)
        self.output = Linear(f, d, bias=True, dtype=dtype, rngs=rngs)
        self.output_norm = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, x_BLD: jax.Array, key_bias_BL: jax.Array) -> jax.Array:
        b, seq, d = x_BLD.shape
        h = d // self.num_heads

        def heads(t: jax.Array) -> jax.Array:
            return t.reshape(b, seq, self.num_heads, h)

        q_BLNH, k_BLNH, v_BLNH = heads(self.query(x_BLD)), heads(self.key(x_BLD)), heads(self.value(x_BLD))
        scores_BNLL = jnp.einsum("bqnh,bknh->bnqk", q_BLNH, k_BLNH, preferred_element_type=jnp.float32)
        scores_BNLL = scores_BNLL / jnp.sqrt(jnp.float32(h)) + key_bias_BL[:, None, None, :]
        probs = jax.nn.softmax(scores_BNLL, axis=-1).astype(v_BLNH.dtype)
        ctx_BLD = jnp.einsum("bnqk,bknh->bqnh", probs, v_BLNH).reshape(b, seq, d)
        x_BLD = self.attention_norm(x_BLD + self.attention_output(ctx_BLD))
        mlp = self.output(jax.nn.gelu(self.intermediate(x_BLD), approximate=False))
        return self.output_norm(x_BLD + mlp)


class BertModel(nnx.Module):
    """Token ids ``[B, L]`` + padding mask -> last hidden states ``[B, L, D]`` (float32)."""

    def __init__(self, cfg: BertConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs) -> None:
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([BertLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])

    def __call__(self, ids_BL: jax.Array, mask_BL: jax.Array) -> jax.Array:
        key_bias_BL = jnp.where(mask_BL, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
        x_BLD = self.embeddings(ids_BL)
        for layer in self.layers:
            x_BLD = layer(x_BLD, key_bias_BL)
        return x_BLD


def pool(hidden_BLD: jax.Array, mask_BL: jax.Array, cfg: PoolingConfig) -> jax.Array:
    """One float32 vector per row from its unpadded token states, then L2-normalised if asked."""
    h = hidden_BLD.astype(jnp.float32)
    m = mask_BL.astype(jnp.float32)[..., None]
    count = jnp.maximum(jnp.sum(m, axis=1), 1.0)
    if cfg.mode == "cls":
        out = h[:, 0]
    elif cfg.mode == "lasttoken":
        last = jnp.sum(mask_BL.astype(jnp.int32), axis=1) - 1
        out = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    elif cfg.mode == "max":
        out = jnp.max(jnp.where(m > 0, h, -1e9), axis=1)
    else:
        total = jnp.sum(h * m, axis=1)
        out = total / (count if cfg.mode == "mean" else jnp.sqrt(count))
    if cfg.normalize:  # sentence-transformers' Normalize: x / max(||x||, 1e-12)
        out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out
