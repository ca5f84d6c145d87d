"""Structured-output request fields -> one ``StructuredOutput`` (or a 400 naming the field).

Accepted, on chat and completions: OpenAI's ``response_format`` (``text``, ``json_object``,
``json_schema``), vLLM's ``structured_outputs`` (``json``, ``regex``, ``choice``, ``grammar``,
``json_object``) and vLLM's older ``guided_json``, ``guided_regex``, ``guided_choice`` and
``guided_grammar``. At most one constraint per request. vLLM's ``structural_tag`` and
``guided_whitespace_pattern`` are not schema fields, so a request using them gets the unknown-field
400 naming them. Whether a spec compiles is the engine's call (``engine/grammar.py``), made before
the request is queued.
"""

from __future__ import annotations

import json
from typing import Any

from jaxserve.sampling_params import StructuredOutput
from jaxserve.server.errors import OpenAIError
from jaxserve.server.protocol import SamplingFields


def _reject(param: str, why: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {why}", param=param)


def _schema(param: str, value: str | dict[str, Any] | None) -> StructuredOutput:
    if value is None:
        raise _reject(param, "a JSON schema is required")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _reject(param, f"the schema is not valid JSON: {e}") from None
    if not isinstance(value, dict | bool):
        raise _reject(param, "the schema must be a JSON object")
    return StructuredOutput("json_schema", json.dumps(value), param=param)  # key order kept: it orders the output


def _choice(param: str, choices: list[str]) -> StructuredOutput:
    if not choices:
        raise _reject(param, "at least one choice is required")
    return StructuredOutput("choice", json.dumps(choices), param=param)


def _text(param: str, kind: str, text: str) -> StructuredOutput:
    if not text:
        raise _reject(param, f"the {kind} must not be empty")
    return StructuredOutput(kind, text, param=param)


def _from_response_format(req: SamplingFields) -> StructuredOutput | None:
    rf = req.response_format
    if rf is None or rf.type == "text":
        if rf is not None and rf.json_schema is not None:
            raise _reject("response_format.json_schema", "only allowed with type 'json_schema'")
        return None
    if rf.type == "json_object":
        return StructuredOutput("json_object", param="response_format")
    if rf.json_schema is None:
        raise _reject("response_format.json_schema", "required when type is 'json_schema'")
    return _schema("response_format.json_schema.schema", rf.json_schema.schema_)


def _constraints(
    prefix: str, json_: str | dict[str, Any] | None, regex: str | None, choice: list[str] | None, grammar: str | None
) -> list[StructuredOutput]:
    """The json / regex / choice / grammar constraints that are set, named ``prefix`` + kind."""
    found = []
    if json_ is not None:
        found.append(_schema(f"{prefix}json", json_))
    if regex is not None:
        found.append(_text(f"{prefix}regex", "regex", regex))
    if choice is not None:
        found.append(_choice(f"{prefix}choice", choice))
    if grammar is not None:
        found.append(_text(f"{prefix}grammar", "grammar", grammar))
    return found


def _from_structured_outputs(req: SamplingFields) -> list[StructuredOutput]:
    so = req.structured_outputs
    if so is None:
        return []
    found = _constraints("structured_outputs.", so.json_, so.regex, so.choice, so.grammar)
    if so.json_object:
        found.append(StructuredOutput("json_object", param="structured_outputs.json_object"))
    if not found:
        raise _reject("structured_outputs", "set one of json, regex, choice, grammar or json_object")
    return found


def structured_output(req: SamplingFields) -> StructuredOutput | None:
    """The request's one output constraint, if any."""
    found = _from_structured_outputs(req)
    if (rf := _from_response_format(req)) is not None:
        found.append(rf)
    found += _constraints("guided_", req.guided_json, req.guided_regex, req.guided_choice, req.guided_grammar)
    if len(found) > 1:
        raise _reject(found[1].param, f"conflicts with {found[0].param}: set only one structured output constraint")
    return found[0] if found else None
