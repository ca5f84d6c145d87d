"""``/metrics`` through the server: every series docs/api.md lists is served, and the histograms
agree with a request whose size is known."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.server.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
API_MD = Path(__file__).parents[2] / "docs" / "api.md"


def _scrape(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", headers=AUTH, timeout=10).text
    out = {}
    for m in re.finditer(r"^(jaxserve:[a-z0-9_]+)(?:\{([^}]*)\})? (\S+)$", text, re.M):
        le = re.search(r'le="([^"]+)"', m[2] or "")
        out[m[1] + (f',le="{le[1]}"' if le else "")] = float(m[3])
    return out


def _documented() -> list[str]:
    section = API_MD.read_text().split("## Metrics", 1)[1]
    return sorted(set(re.findall(r"`(jaxserve:[a-z0-9_]+)`", section)))


def test_every_documented_series_is_served(lookback_server):
    served = {k.split(",")[0] for k in _scrape(lookback_server.base_url)}
    names = _documented()
    assert len(names) >= 25
    for name in names:
        assert name in served or f"{name}_count" in served, name


def test_histograms_agree_with_a_known_request(lookback_server):
    base = lookback_server.base_url
    before = _scrape(base)
    body = {"model": "lookback", "prompt": [5, 6, 7], "max_tokens": 9, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{base}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 9
    after = _scrape(base)

    def delta(name: str) -> float:
        return after[f"jaxserve:{name}"] - before.get(f"jaxserve:{name}", 0.0)

    assert delta("request_generation_tokens_count") == 1 and delta("request_generation_tokens_sum") == 9
    assert delta("request_prompt_tokens_count") == 1 and delta("request_prompt_tokens_sum") == 3
    assert delta("time_to_first_token_seconds_count") == 1 and delta("inter_token_latency_seconds_count") == 8
    assert 0 < delta("time_to_first_token_seconds_sum") <= delta("e2e_request_latency_seconds_sum")
    assert delta("request_decode_time_seconds_sum") <= delta("e2e_request_latency_seconds_sum")
    assert delta('request_generation_tokens_bucket,le="10.0"') == 1  # 9 tokens: the le=10 bucket
    assert delta('request_generation_tokens_bucket,le="5.0"') == 0
    assert after['jaxserve:request_generation_tokens_bucket,le="+Inf"'] == after["jaxserve:request_generation_tokens_count"]
    assert delta("engine_step_time_seconds_count") >= 1
    assert after["jaxserve:compiles_while_serving_total"] == 0
