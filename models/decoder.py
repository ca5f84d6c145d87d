"""The decoder-only transformer shared by the Llama, Mistral, Qwen2 and Qwen3 families.

Family differences are flags on ``ModelConfig`` (q/k/v bias, q/k RMSNorm, tied embeddings, RoPE
scaling). Layers are a Python list, so the jitted step unrolls them and each layer's KV pages are
a separate donated buffer (updated in place; a ``lax.scan`` over stacked layers would copy them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxserve.models.attention import AttentionMetadata, dense_causal_attention, paged_attention
from jaxserve.models.attention_backends import KVCache, get_backend
from jaxserve.models.config import ModelConfig
from jaxserve.models.layers import Embedding, GatedMLP, Linear, RMSNorm, apply_rope, rope_inv_freq
from jaxserve.models.lora import LayerLora, LoraBatch, add_lora
from jaxserve.models.products import for_mesh
from jaxserve.models.qkv_layout import QKVLayout


class SelfAttention(nnx.Module):
    """Multi-head attention with GQA over the paged KV cache."""

    def __init__(
        self, cfg: ModelConfig, *, dtype: jnp.dtype, backend: str, mesh: Mesh | None, rngs: nnx.Rngs
    ) -> None:
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # q, k and v in one product, features laid out shard-major (models/qkv_layout.py).
        self.layout = QKVLayout(n, k, h, tp=mesh.shape["model"] if mesh is not None else 1)
        product = for_mesh(get_backend(backend).product, mesh)
        self.qkv_proj = Linear(d, self.layout.num_features, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs, product=product)
        self.o_proj = Linear(n * h, d, bias=cfg.o_bias, dtype=dtype, rngs=rngs, product=product)
        self.q_norm = RMSNorm(h, eps=cfg.rms_norm_eps, dtype=dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(h, eps=cfg.rms_norm_eps, dtype=dtype) if cfg.qk_norm else None
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        self.inv_freq = tuple(rope_inv_freq(h, cfg.rope_theta, cfg.rope_scaling).tolist())
        self.backend = backend
        self.mesh = mesh

    def __call__(
        self, r_TD: jax.Array, x_TD: jax.Array, positions_T: jax.Array, kv_cache: KVCache, meta: AttentionMetadata,
        lora: LayerLora | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """The residual stream ``r_TD`` plus the attention of ``x_TD`` (o_proj's product accumulated
        into it, ``Linear.add_to``), and the updated cache."""
        t = x_TD.shape[0]
        q, k, v = self.layout.split(add_lora(self.qkv_proj(x_TD), x_TD, lora, "qkv_proj", self.layout))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        q = apply_rope(q, positions_T, inv_freq)
        k = apply_rope(k, positions_T, inv_freq)
        o, kv_cache = paged_attention(
            q, k, v, kv_cache, meta, sm_scale=self.head_dim**-0.5, backend=self.backend, mesh=self.mesh
        )
        o = o.reshape(t, self.num_heads * self.head_dim)
        return self.o_proj.add_to(r_TD, o, lora, "o_proj"), kv_cache

    def dense(self, r_BLD: jax.Array, x_BLD: jax.Array, mask_BL: jax.Array) -> jax.Array:
        """``r_BLD`` plus cache-free causal attention of ``x_BLD``'s right-padded rows (positions 0..L-1)."""
        b, n, _ = x_BLD.shape
        q, k, v = self.layout.split(self.qkv_proj(x_BLD.reshape(b * n, -1)))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        positions = jnp.tile(jnp.arange(n, dtype=jnp.int32), b)
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        o = dense_causal_attention(q.reshape(b, n, *q.shape[1:]), k.reshape(b, n, *k.shape[1:]),
                                   v.reshape(b, n, *v.shape[1:]), mask_BL, sm_scale=self.head_dim**-0.5)
        return self.o_proj.add_to(r_BLD, o.reshape(b, n, self.num_heads * self.head_dim))


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)) (each product accumulated into x where
    its product allows: ``products.matmul_t_add``)."""

    def __init__(
        self, cfg: ModelConfig, *, dtype: jnp.dtype, backend: str, mesh: Mesh | None, rngs: nnx.Rngs
    ) -> None:
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = SelfAttention(cfg, dtype=dtype, backend=backend, mesh=mesh, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs,
                            product=for_mesh(get_backend(backend).product, mesh))

    def __call__(
        self, x_TD: jax.Array, positions_T: jax.Array, kv_cache: KVCache, meta: AttentionMetadata,
        lora: LayerLora | None = None,
    ) -> tuple[jax.Array, KVCache]:
        x_TD, kv_cache = self.self_attn(x_TD, self.input_layernorm(x_TD), positions_T, kv_cache, meta, lora)
        return self.mlp.add_to(x_TD, self.post_attention_layernorm(x_TD), lora), kv_cache

    def dense(self, x_BLD: jax.Array, mask_BL: jax.Array) -> jax.Array:
        """The same block over padded rows with ``SelfAttention.dense`` (no KV cache)."""
        x_BLD = self.self_attn.dense(x_BLD, self.input_layernorm(x_BLD), mask_BL)
        return self.mlp.add_to(x_BLD, self.post_attention_layernorm(x_BLD))


class DecoderForCausalLM(nnx.Module):
    """Embedding, decoder layers, final norm and LM head over a flat ragged batch."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: jnp.dtype,
        backend: str = "reference",
        compute_dtype: jnp.dtype | None = None,
        mesh: Mesh | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        self.config = cfg
        # Activations (residual stream) dtype; parameters are ``dtype``. On CPU: bf16 weights, f32 activations.
        self.compute_dtype = jnp.dtype(compute_dtype or dtype)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [DecoderLayer(cfg, dtype=dtype, backend=backend, mesh=mesh, rngs=rngs) for _ in range(cfg.num_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        # A separate parameter even when tied: under tensor parallelism the head is vocab-parallel
        # while the embedding is replicated (on one device the loader gives both the same buffer).
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs,
                              product=for_mesh(get_backend(backend).lm_head_product, mesh))

    def __call__(
        self,
        tokens_T: jax.Array,
        positions_T: jax.Array,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        logits_indices_B: jax.Array,
        lora: LoraBatch | None = None,
    ) -> tuple[jax.Array, list[KVCache]]:
        """Run every token of the batch; return float32 logits [B, V] at ``logits_indices_B``.

        ``kv_caches`` holds one cache per layer, laid out by the attention backend; the updated list
        is returned. ``lora`` (``models/lora.py``): adapter slots and each token's slot; None traces
        the model without any LoRA code.
        """
        h, new_caches = self.final_hidden(tokens_T, positions_T, kv_caches, meta, logits_indices_B, lora)
        return self.lm_head(h.astype(jnp.float32)), new_caches

    def final_hidden(
        self,
        tokens_T: jax.Array,
        positions_T: jax.Array,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        indices_B: jax.Array,
        lora: LoraBatch | None = None,
    ) -> tuple[jax.Array, list[KVCache]]:
        """Run every token of the batch; return the final-norm hidden states [B, D] at ``indices_B``
        (the LM head's input; a paged embedder's last-token state) and the updated caches."""
        x = self.embed_tokens(tokens_T).astype(self.compute_dtype)
        new_caches = []
        for i, (layer, cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            x, cache = layer(x, positions_T, cache, meta, None if lora is None else lora.layer(i))
            new_caches.append(cache)
        return self.norm(x[indices_B]), new_caches

    def hidden_states(self, tokens_BL: jax.Array, mask_BL: jax.Array) -> jax.Array:
        """Final-norm hidden states [B, L, D] of right-padded rows, without a KV cache (embedders).

        ``mask_BL`` marks real tokens; each row's real tokens come first (positions 0..len-1).
        """
        x = self.embed_tokens(tokens_BL).astype(self.compute_dtype)
        for layer in self.layers:
            x = layer.dense(x, mask_BL)
        return self.norm(x)
