"""Chat requests with tools: which flags allow what, the template's inputs, and the constraint.

``tool_choice`` (default ``auto`` when tools are sent, else ``none``):

- ``none``: the tools are rendered in the prompt; the output is plain text.
- ``auto``: needs ``--enable-auto-tool-choice`` (and so ``--tool-call-parser``); the model writes
  text or calls, parsed in its format. If a tool is ``strict``, a lazy grammar switches on at the
  call's opening markup and keeps every call's arguments schema-valid.
- ``required`` / ``{"type": "function", "function": {"name": ...}}``: need ``--tool-call-parser``;
  the output is constrained to calls in the model's own format (hermes: ``<tool_call>\\n{"name":
  "f", "arguments": <the parameters schema>}\\n</tool_call>``, several if ``parallel_tool_calls``;
  llama3_json: ``{"name": "f", "parameters": ...}`` joined by ``; ``) by an llguidance Lark
  grammar whose arguments are ``%json`` of the function's parameters.

A chat template that never mentions ``tools`` cannot show them to the model: a 400 naming
``--chat-template``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from jaxserve.config import ServeConfig
from jaxserve.engine.grammar import JSON_OPTIONS
from jaxserve.sampling_params import StructuredOutput
from jaxserve.server.errors import OpenAIError
from jaxserve.server.protocol import ChatCompletionRequest, ToolDefinition
from jaxserve.server.reasoning import reasoning_prefix

_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclasses.dataclass(frozen=True)
class ChatOptions:
    """A served model's chat settings (from its ``ServeConfig``)."""

    chat_template: str | None = None  # overrides the tokenizer's
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None

    @classmethod
    def from_config(cls, config: ServeConfig) -> ChatOptions:
        return cls(config.chat_template_text, config.enable_auto_tool_choice, config.tool_call_parser,
                   config.reasoning_parser)


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for the prompt, the constraint and the output parsing."""

    template_tools: list[dict[str, Any]] | None = None  # for apply_chat_template(tools=...)
    parse_format: str | None = None  # the tool-call parser for the output; None: plain text
    max_calls: int | None = None  # parallel_tool_calls=false: 1
    structured: StructuredOutput | None = None
    forced: bool = False  # required / named: every reply is calls


def _reject(param: str, why: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {why}", param=param)


def _check_tools(tools: list[ToolDefinition]) -> None:
    seen: set[str] = set()
    for i, t in enumerate(tools):
        name = t.function.name
        if not _FUNCTION_NAME.fullmatch(name):
            raise _reject(f"tools[{i}].function.name", f"{name!r} must be 1-64 of a-z, A-Z, 0-9, _, . and -")
        if name in seen:
            raise _reject(f"tools[{i}].function.name", f"{name!r} is defined twice")
        seen.add(name)
        params = t.function.parameters
        if params is not None and params.get("type", "object") != "object":
            raise _reject(f"tools[{i}].function.parameters", "must be a JSON schema of type 'object'")


def _choice(req: ChatCompletionRequest) -> str:
    """'none', 'auto', 'required' or 'function' (named)."""
    choice = req.tool_choice
    if choice is None:
        return "auto" if req.tools else "none"
    return choice if isinstance(choice, str) else "function"


def thinking(req: ChatCompletionRequest, opts: ChatOptions) -> str | None:
    """The reasoning parser whose thinking section a grammar must allow first; None when there is
    none or the request turned thinking off (Qwen3's ``chat_template_kwargs.enable_thinking: false``)."""
    if (req.chat_template_kwargs or {}).get("enable_thinking", True) is False:
        return None
    return opts.reasoning_parser


def plan_tools(req: ChatCompletionRequest, opts: ChatOptions, template: Any) -> ToolPlan:
    """The request's ToolPlan (``template``: the chat template in use), or a 400 naming the field or
    the missing server flag."""
    choice = _choice(req)
    if not req.tools:
        if choice not in ("none", "auto"):
            raise _reject("tool_choice", f"{choice!r} needs tools")
        return ToolPlan()
    _check_tools(req.tools)
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    if choice == "none":
        return ToolPlan(template_tools=tools)
    if choice == "auto" and not opts.enable_auto_tool_choice:
        raise _reject("tool_choice", '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                      "to be set on the server (send tool_choice 'none' to only show the tools)")
    if opts.tool_call_parser is None:
        raise _reject("tool_choice", f"{choice!r} tool choice requires the server's --tool-call-parser "
                      "(the model's tool-call format: hermes or llama3_json)")
    if template is not None and "tools" not in str(template):
        raise _reject("tools", "this model's chat template does not render tools; start the server with "
                      "--chat-template (e.g. hermes_tool_chat.jinja with --tool-call-parser hermes)")
    functions = req.tools
    if choice == "function":
        name = req.tool_choice.function.name  # type: ignore[union-attr]
        functions = [t for t in req.tools if t.function.name == name]
        if not functions:
            raise _reject("tool_choice.function.name", f"{name!r} is not one of the tools")
    parallel = req.parallel_tool_calls is not False
    plan = dict(template_tools=tools, parse_format=opts.tool_call_parser, max_calls=None if parallel else 1)
    if choice == "auto":
        if not any(t.function.strict for t in req.tools):
            return ToolPlan(**plan)
        lark = call_grammar(opts.tool_call_parser, functions, parallel=True, lazy=True,
                            reasoning=thinking(req, opts))
        return ToolPlan(**plan, structured=StructuredOutput("grammar", lark, param="tools"))
    lark = call_grammar(opts.tool_call_parser, functions, parallel=parallel and choice == "required",
                        reasoning=thinking(req, opts))
    return ToolPlan(**plan, structured=StructuredOutput("grammar", lark, param="tools"), forced=True)


def _arguments_schema(tool: ToolDefinition) -> str:
    schema = tool.function.parameters or _EMPTY_PARAMETERS
    return "%json " + json.dumps({"x-guidance": JSON_OPTIONS, **schema})


def call_grammar(fmt: str, tools: list[ToolDefinition], *, parallel: bool, lazy: bool = False,
                 reasoning: str | None = None) -> str:
    """An llguidance Lark grammar for calls of ``tools`` in format ``fmt``.

    ``lazy``: free text, where each opening ``<tool_call>`` starts a constrained call (hermes only;
    llama3_json's calls are the whole output, so there a call or text not starting with ``{``).
    ``reasoning``: the thinking section may come first (``server/reasoning.py``).
    """
    rules = []
    for i, t in enumerate(tools):
        name = json.dumps(t.function.name)[1:-1]
        if fmt == "hermes":
            head = json.dumps('\n{"name": "' + name + '", "arguments": ')
            tail = json.dumps("}\n</tool_call>")
            rules.append(f"call{i}: {'call_hd ' if lazy else json.dumps('<tool_call>') + ' '}{head} args{i} {tail}")
        else:
            head = json.dumps('{"name": "' + name + '", "parameters": ')
            rules.append(f"call{i}: {head} args{i} \"}}\"")
        rules.append(f"args{i}: {_arguments_schema(t)}")
    rules.append("call: " + " | ".join(f"call{i}" for i in range(len(tools))))
    sep = '"\\n"' if fmt == "hermes" else '"; "'
    if lazy and fmt == "hermes":
        body = "body: call* TEXT\nTEXT: /(.|\\n)*/\ncall_hd[lazy]: TEXT \"<tool_call>\""
    elif lazy:
        body = "body: call | TEXT\nTEXT: /[^{](.|\\n)*/"
    else:
        body = f"body: call ({sep} call)*" if parallel else "body: call"
    start = reasoning_prefix(reasoning) if reasoning else "start: body\n"
    return start + body + "\n" + "\n".join(rules) + "\n"
