"""A checkpoint's generation_config.json: unset sampling fields default to it, and its EOS ids end
generation (on the lookback model, whose greedy tokens are known)."""

from __future__ import annotations

import json
import shutil

from jaxserve.server.protocol import CompletionRequest
from jaxserve.server.requests import sampling_params
from tests.engine.engine_helpers import make_engine
from tests.helpers import lookback_continue


def test_generation_config_supplies_defaults_and_eos_ids(lookback_model, tmp_path):
    directory = tmp_path / "with-generation-config"
    shutil.copytree(lookback_model, directory)
    prompt = [10, 11]
    greedy = lookback_continue(prompt, 12)
    extra_eos = greedy[4]
    (directory / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [2, extra_eos], "temperature": 0.0, "top_p": 0.5, "top_k": 7, "max_new_tokens": 3}
    ))
    eng = make_engine(directory)
    assert eng.default_sampling == {"temperature": 0.0, "top_p": 0.5, "top_k": 7}
    assert extra_eos in eng.eos_token_ids and 2 in eng.eos_token_ids
    unset = sampling_params(CompletionRequest(prompt=prompt), max_tokens=12, defaults=eng.default_sampling)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.min_p) == (0.0, 0.5, 7, 0.0)
    explicit = sampling_params(CompletionRequest(prompt=prompt, temperature=1.5, top_p=1.0), max_tokens=12,
                               defaults=eng.default_sampling)
    assert (explicit.temperature, explicit.top_p, explicit.top_k) == (1.5, 1.0, 7)
    # Greedy by default, and the config's extra EOS id ends the request (emitted, as EOS is).
    assert eng.generate([prompt], unset) == [greedy[:5]]
    assert make_engine(lookback_model).generate([prompt], unset) == [greedy]  # no config: no extra EOS
