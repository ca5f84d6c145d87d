"""Structured outputs over HTTP on the lookback server: every request field that carries a
constraint, with n > 1, logprobs and streaming, and the 400s for what is not supported."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import openai
import pydantic
import pytest

from tests.server.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MSG = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"mood": {"enum": ["calm", "busy"]},
                                           "level": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["mood", "level"], "additionalProperties": False}


class Status(pydantic.BaseModel):
    mood: Literal["calm", "busy"]
    level: int = pydantic.Field(ge=0, le=9)


def _valid(text: str) -> bool:
    v = json.loads(text)
    return set(v) == {"mood", "level"} and v["mood"] in ("calm", "busy") and v["level"] in range(10)


def test_sdk_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(model="lookback", messages=MSG, response_format=Status, max_tokens=40)
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Status)
    assert _valid(choice.message.content)


def test_chat_json_schema_with_n_and_logprobs(client):
    r = client.chat.completions.create(
        model="lookback", messages=MSG, max_tokens=40, n=2, temperature=1.0, seed=3, logprobs=True, top_logprobs=2,
        response_format={"type": "json_schema", "json_schema": {"name": "status", "schema": SCHEMA, "strict": True}},
    )
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.finish_reason == "stop" and _valid(c.message.content)
        assert "".join(t.token for t in c.logprobs.content) == c.message.content


@pytest.mark.parametrize("field", [
    {"guided_json": SCHEMA}, {"structured_outputs": {"json": json.dumps(SCHEMA)}},
])
def test_vllm_json_fields_on_completions_stream_equals_non_stream(lookback_server, field):
    url = f"{lookback_server.base_url}/v1/completions"
    body = {"prompt": "status:", "max_tokens": 40, "n": 2, "temperature": 1.0, "seed": 5, "logprobs": 1, **field}
    whole = httpx.post(url, headers=AUTH, json=body, timeout=60).json()
    texts = [c["text"] for c in whole["choices"]]
    assert all(_valid(t) for t in texts) and all(c["finish_reason"] == "stop" for c in whole["choices"])
    streamed = ["", ""]
    with httpx.stream("POST", url, headers=AUTH, json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    streamed[c["index"]] += c["text"]
    assert streamed == texts


def test_regex_choice_and_grammar_fields(lookback_server):
    url = f"{lookback_server.base_url}/v1/chat/completions"
    cases = [
        ({"guided_regex": "[a-c]{3}-[0-9]{2}"}, lambda t: re.fullmatch("[a-c]{3}-[0-9]{2}", t)),
        ({"structured_outputs": {"regex": "(up|down)[0-9]"}}, lambda t: re.fullmatch("(up|down)[0-9]", t)),
        ({"guided_choice": ["left", "right"]}, lambda t: t in ("left", "right")),
        ({"structured_outputs": {"choice": ["x", "yy"]}}, lambda t: t in ("x", "yy")),
        ({"guided_grammar": 'start: "n=" /[0-9]{1,2}/'}, lambda t: re.fullmatch("n=[0-9]{1,2}", t)),
        ({"structured_outputs": {"grammar": 'root ::= "v" [0-9]'}}, lambda t: re.fullmatch("v[0-9]", t)),
        ({"response_format": {"type": "json_object"}, "max_tokens": 200}, lambda t: isinstance(json.loads(t), dict)),
        ({"structured_outputs": {"json_object": True}, "max_tokens": 200}, lambda t: isinstance(json.loads(t), dict)),
    ]
    for field, ok in cases:
        body = {"messages": MSG, "max_tokens": 30, "temperature": 0.8, "seed": 1, **field}
        r = httpx.post(url, headers=AUTH, json=body, timeout=60).json()
        text = r["choices"][0]["message"]["content"]
        assert r["choices"][0]["finish_reason"] == "stop" and ok(text), (field, r)
    plain = httpx.post(url, headers=AUTH, json={"messages": MSG, "max_tokens": 5, "response_format": {"type": "text"}})
    assert plain.status_code == 200


def test_unsupported_or_invalid_constraints_are_400s_naming_the_field(lookback_server):
    chat = f"{lookback_server.base_url}/v1/chat/completions"
    cmpl = f"{lookback_server.base_url}/v1/completions"
    cases = [
        (chat, {"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
         "response_format.json_schema.schema", "uniqueItems"),
        (chat, {"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
        (cmpl, {"guided_regex": "a(b"}, "guided_regex", "unclosed group"),
        (cmpl, {"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        (cmpl, {"guided_grammar": "start: missing_rule"}, "guided_grammar", "missing_rule"),
        (cmpl, {"guided_choice": []}, "guided_choice", "at least one"),
        (cmpl, {"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag", "unknown field"),
        (cmpl, {"guided_json": SCHEMA, "guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "unknown field"),
        (cmpl, {"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "conflicts with guided_regex"),
        (cmpl, {"structured_outputs": {}}, "structured_outputs", "set one of"),
    ]
    for url, field, param, needle in cases:
        base = {"messages": MSG} if url == chat else {"prompt": "x"}
        r = httpx.post(url, headers=AUTH, json={**base, "max_tokens": 5, **field})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == param and needle in err["message"], (field, err)


def test_sdk_reports_a_bad_schema_before_any_stream(client):
    with pytest.raises(openai.BadRequestError, match="Unimplemented keys"):
        client.chat.completions.create(
            model="lookback", messages=MSG, stream=True, max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"if": {}, "then": {}}}},
        )
