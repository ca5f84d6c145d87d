"""Logits processors on device: logit_bias (also how min_tokens masks EOS/stop ids) and the
presence / frequency / repetition penalties, with vLLM's semantics and order:
bias first, then repetition (prompt + output tokens), then frequency and presence (output tokens).

They need per-row token histories, so only steps with such a request carry them
(``LogitsExtras`` with non-zero widths); other steps pass zero-width arrays and the code below
vanishes at trace time. With async scheduling a row's last output token may still be in flight
(``PLACEHOLDER`` on the host): its history column is named in ``pending_col`` and filled on device
from the step's own input token (``fill_pending_history``), so penalty steps stay asynchronous.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.request import PLACEHOLDER, Request
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
    pending_col: jax.Array  # i32[B]   history column of the row's in-flight output token (-1: none)


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
    """Host arrays for one step; zero-width unless ``with_extras`` (then the same read-only arrays
    for every step of ``num_rows``)."""
    if not with_extras:
        return _no_extras(num_rows)
    e, hl = MAX_BIAS_ENTRIES, history_len
    bias_ids = np.zeros((num_rows, e), np.int32)
    bias_vals = np.zeros((num_rows, e), np.float32)
    hist_ids = np.zeros((num_rows, hl), np.int32)
    hist_kind = np.zeros((num_rows, hl), np.int32)
    presence = np.zeros(num_rows, np.float32)
    frequency = np.zeros(num_rows, np.float32)
    repetition = np.ones(num_rows, np.float32)
    pending_col = np.full(num_rows, -1, np.int32)
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
            pending_col[i] = _fill_history(req, hist_ids[i], hist_kind[i])
    return LogitsExtras(bias_ids, bias_vals, hist_ids, hist_kind, presence, frequency, repetition, pending_col)


@functools.lru_cache(maxsize=16)
def _no_extras(num_rows: int) -> LogitsExtras:
    """Zero-width bias and histories, neutral penalties, no pending column: a step without extras."""
    z = np.zeros((num_rows, 0), np.int32)
    extras = LogitsExtras(z, z.astype(np.float32), z, z, np.zeros(num_rows, np.float32),
                          np.zeros(num_rows, np.float32), np.ones(num_rows, np.float32), np.full(num_rows, -1, np.int32))
    for a in jax.tree.leaves(extras):
        a.flags.writeable = False
    return extras


def _fill_history(req: Request, ids: np.ndarray, kind: np.ndarray) -> int:
    """Write ``req``'s prompt and output tokens into one history row; returns the column of its
    in-flight last output (-1: none). Only the last output can be in flight (one step at a time)."""
    n_p, n_o = req.num_prompt_tokens, req.num_output_tokens
    ids[:n_p] = req.prompt_token_ids
    kind[:n_p] = HIST_PROMPT
    kind[n_p : n_p + n_o] = HIST_OUTPUT
    if not req.num_pending:
        ids[n_p : n_p + n_o] = req.output_token_ids
        return -1
    if req.num_pending != 1 or req.output_token_ids[-1] != PLACEHOLDER:
        raise RuntimeError(f"request {req.request_id}: {req.num_pending} outputs in flight; penalties read one at most")
    ids[n_p : n_p + n_o - 1] = req.output_token_ids[:-1]
    return n_p + n_o - 1


def complete_pending_history(extras: LogitsExtras, requests: list[Request]) -> LogitsExtras:
    """A grammar step's host extras with each in-flight history token (``pending_col``) filled from
    its request: the previous step has been applied when its sampling is dispatched."""
    rows = np.flatnonzero(extras.pending_col >= 0)
    if not rows.size:
        return extras
    hist = extras.hist_ids.copy()
    for b in rows:
        req, col = requests[b], int(extras.pending_col[b])
        out = req.output_token_ids  # a request that finished meanwhile may have dropped it: its row is ignored
        hist[b, col] = max(out[col - req.num_prompt_tokens], 0) if col - req.num_prompt_tokens < len(out) else 0
    return dataclasses.replace(extras, hist_ids=hist, pending_col=np.full_like(extras.pending_col, -1))


def fill_pending_history(ex: LogitsExtras, last_tokens_B: jax.Array) -> LogitsExtras:
    """The histories with each row's in-flight output (``pending_col``) set to ``last_tokens_B``
    (the token the row's chunk ends with, read on device); a no-op without histories."""
    if not ex.hist_ids.shape[1]:
        return ex
    cols = jnp.arange(ex.hist_ids.shape[1])[None, :]
    hist = jnp.where(cols == ex.pending_col[:, None], last_tokens_B[:, None], ex.hist_ids)
    return dataclasses.replace(ex, hist_ids=hist)


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
