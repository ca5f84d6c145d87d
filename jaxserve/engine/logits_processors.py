"""Logits processors on device: logit_bias (also how min_tokens masks EOS/stop ids) and the
presence / frequency / repetition penalties, with vLLM's semantics and order:
bias first, then repetition (prompt + output tokens), then frequency and presence (output tokens).

They need per-row token histories, so only steps with such a request carry them
(``LogitsExtras`` with non-zero widths); other steps pass zero-width arrays and the code below
vanishes at trace time.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.request import Request
from jaxserve.sampling_params import MAX_LOGIT_BIAS

MAX_BIAS_ENTRIES = MAX_LOGIT_BIAS + 64  # + EOS and stop_token_ids masked while below min_tokens

HIST_PAD, HIST_PROMPT, HIST_OUTPUT = 0, 1, 2


@dataclasses.dataclass
class LogitsExtras:
    """Per-row processor inputs; widths are 0 in steps without such requests."""

    bias_ids: jax.Array  # i32[B, E]   token ids to bias (padding: id 0, value 0)
    bias_vals: jax.Array  # f32[B, E]   added to the logits (-inf masks a token)
    hist_ids: jax.Array  # i32[B, L]   prompt + output token ids of the row
    hist_kind: jax.Array  # i32[B, L]   HIST_PAD / HIST_PROMPT / HIST_OUTPUT
    presence: jax.Array  # f32[B]
    frequency: jax.Array  # f32[B]
    repetition: jax.Array  # f32[B] (1 = off)


jax.tree_util.register_dataclass(
    LogitsExtras, data_fields=[f.name for f in dataclasses.fields(LogitsExtras)], meta_fields=[]
)


def needs_extras(req: Request) -> bool:
    """Whether ``req``'s next token needs bias or penalties."""
    p = req.params
    return bool(
        p.logit_bias
        or p.has_penalties
        or (req.num_output_tokens < p.min_tokens)
    )


def build_logits_extras(reqs: list[Request], num_rows: int, *, with_extras: bool, history_len: int) -> LogitsExtras:
    """Host arrays for one step; zero-width unless ``with_extras``."""
    e = MAX_BIAS_ENTRIES if with_extras else 0
    hl = history_len if with_extras else 0
    bias_ids = np.zeros((num_rows, e), np.int32)
    bias_vals = np.zeros((num_rows, e), np.float32)
    hist_ids = np.zeros((num_rows, hl), np.int32)
    hist_kind = np.zeros((num_rows, hl), np.int32)
    presence = np.zeros(num_rows, np.float32)
    frequency = np.zeros(num_rows, np.float32)
    repetition = np.ones(num_rows, np.float32)
    if with_extras:
        for i, req in enumerate(reqs):
            p = req.params
            entries = dict(p.logit_bias)
            if req.num_output_tokens < p.min_tokens:
                for t in (*req.eos_token_ids, *p.stop_token_ids):
                    if not p.ignore_eos or t not in req.eos_token_ids:
                        entries[t] = -np.inf
            for j, (tid, val) in enumerate(entries.items()):
                bias_ids[i, j] = tid
                bias_vals[i, j] = val
            presence[i], frequency[i], repetition[i] = p.presence_penalty, p.frequency_penalty, p.repetition_penalty
            if p.has_penalties:
                n_p, n_o = req.num_prompt_tokens, req.num_output_tokens
                hist_ids[i, :n_p] = req.prompt_token_ids
                hist_ids[i, n_p : n_p + n_o] = req.output_token_ids
                hist_kind[i, :n_p] = HIST_PROMPT
                hist_kind[i, n_p : n_p + n_o] = HIST_OUTPUT
    return LogitsExtras(bias_ids, bias_vals, hist_ids, hist_kind, presence, frequency, repetition)


def apply_logits_processors(logits_BV: jax.Array, ex: LogitsExtras) -> jax.Array:
    """Bias, then penalties; a no-op (at trace time) when the extras are zero-width."""
    b, v = logits_BV.shape
    rows = jnp.arange(b)[:, None]
    if ex.bias_ids.shape[1]:
        logits_BV = logits_BV.at[rows, ex.bias_ids].add(ex.bias_vals)
    if ex.hist_ids.shape[1]:
        out_counts = jnp.zeros((b, v), jnp.float32).at[rows, ex.hist_ids].add(
            (ex.hist_kind == HIST_OUTPUT).astype(jnp.float32)
        )
        seen = jnp.zeros((b, v), jnp.bool_).at[rows, ex.hist_ids].max(ex.hist_kind != HIST_PAD)
        rep = ex.repetition[:, None]
        penalised = jnp.where(logits_BV > 0, logits_BV / rep, logits_BV * rep)
        logits_BV = jnp.where(seen, penalised, logits_BV)
        logits_BV = logits_BV - ex.frequency[:, None] * out_counts
        logits_BV = logits_BV - ex.presence[:, None] * (out_counts > 0)
    return logits_BV
