"""Token ids -> text deltas per request: incremental detokenization and stop strings.

A stop string can span several tokens, so text that might be the start of a stop string is held
back until it is known not to be one; a matched stop string (and everything after it) is never
emitted unless ``include_stop_str_in_output``.
"""

from __future__ import annotations

import dataclasses

from jaxserve.request import Finish, Request
from jaxserve.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A generated token's raw-model logprob and the ``k`` most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    stop_reason: str | int | None  # the stop string or stop token id that ended it
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per new token, when requested
    error: str | None = None  # an internal fault ended this request alone (finished, finish_reason "error")


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class RequestTextState:
    """Detokenizer plus the stop-string window of one request."""

    def __init__(self, tok: Tokenizer, req: Request) -> None:
        self.detok = IncrementalDetokenizer(
            tok, req.prompt_token_ids, skip_special_tokens=req.params.skip_special_tokens
        )
        self.stops = req.params.stop
        self.include_stop = req.params.include_stop_str_in_output
        self.text = ""  # all decoded text so far
        self.emitted = 0  # characters of ``text`` already returned

    def update(self, token_ids: list[int], finishing: bool, check_stops: bool = True) -> tuple[str, str | None]:
        """Add tokens; return (text to emit now, matched stop string or None).

        With ``check_stops`` False (below min_tokens) stop strings are not matched yet, but text that
        could start one is still held back.
        """
        self.text += self.detok.add(token_ids)
        if finishing:
            self.text += self.detok.flush()
        if self.stops:
            search_from = max(0, self.emitted - max(len(s) for s in self.stops) + 1)
            hit: tuple[int, str] | None = None
            for s in self.stops if check_stops else ():
                i = self.text.find(s, search_from)
                if i >= 0 and (hit is None or i < hit[0]):
                    hit = (i, s)
            if hit is not None:
                end = hit[0] + (len(hit[1]) if self.include_stop else 0)
                out = self.text[self.emitted : max(end, self.emitted)]
                self.emitted = max(end, self.emitted)
                return out, hit[1]
            if not finishing:
                limit = len(self.text) - _held_back(self.text, self.stops)
                out = self.text[self.emitted : max(limit, self.emitted)]
                self.emitted = max(limit, self.emitted)
                return out, None
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out, None


class OutputProcessor:
    """Keeps a RequestTextState per live request and builds RequestOutputs.

    Whether a request finishes is not decided here (``engine/step_results.decide_finish``): this
    class only turns tokens into text and reports a matched stop string.
    """

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.states: dict[str, RequestTextState] = {}

    def add(self, req: Request) -> None:
        self.states[req.request_id] = RequestTextState(self.tok, req)

    def remove(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def update_text(self, req: Request, new_token_ids: list[int], *, check_stops: bool) -> tuple[str, str | None]:
        """Text to emit after ``new_token_ids`` (possibly held back) and the stop string it matched, if any."""
        return self.states[req.request_id].update(new_token_ids, False, check_stops)

    def flush_text(self, req: Request, *, check_stops: bool) -> tuple[str, str | None]:
        """The request is ending: everything still held back (and a stop string completed by it)."""
        return self.states[req.request_id].update([], True, check_stops)

    @staticmethod
    def build(
        req: Request,
        new_token_ids: list[int],
        text: str,
        finish: Finish | None,
        logprobs: list[TokenLogprob] | None,
        num_output_tokens: int,
    ) -> RequestOutput:
        """The ``RequestOutput`` for one step of ``req``: its new tokens and text, logprobs, and how it ended (if it did)."""
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=new_token_ids,
            new_text=text,
            finished=finish is not None,
            finish_reason=finish.status.value if finish is not None else None,
            stop_reason=finish.stop_reason if finish is not None else None,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=num_output_tokens,
            logprobs=logprobs,
        )
