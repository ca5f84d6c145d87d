"""Pooling, normalisation and max length come from a sentence-transformers directory's files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jaxserve.models.bert import PoolingConfig
from jaxserve.weights.sentence_transformers import SentenceTransformersError, read_sentence_transformers

TRANSFORMER = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}


def _write(d: Path, modules: list[dict], pooling: dict | None, max_len: int | None = None) -> Path:
    (d / "modules.json").write_text(json.dumps(modules))
    if pooling is not None:
        (d / "1_Pooling").mkdir(exist_ok=True)
        (d / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if max_len is not None:
        (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_len}))
    return d


def _pooling(type_: str = "sentence_transformers.models.Pooling") -> dict:
    return {"idx": 1, "name": "1", "path": "1_Pooling", "type": type_}


def test_minilm_as_shipped(minilm_dir):
    assert not (minilm_dir / "2_Normalize").exists()  # listed in modules.json, absent on disk
    st = read_sentence_transformers(minilm_dir)
    assert st.pooling == PoolingConfig("mean", normalize=True)
    assert st.max_seq_length == 256  # sentence_bert_config.json, not the tokenizer's 512


@pytest.mark.parametrize(("pooling", "mode"), [
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
    ({"pooling_mode_mean_sqrt_len_tokens": True}, "mean_sqrt_len"),
    ({"pooling_mode_lasttoken": True}, "lasttoken"),
    ({"pooling_mode": "lasttoken", "include_prompt": True}, "lasttoken"),  # the newer string format
    ({"pooling_mode": "mean"}, "mean"),
    ({"pooling_mode": "max"}, "max"),
])
def test_both_pooling_formats(tmp_path, pooling, mode):
    newer = "sentence_transformers.sentence_transformer.modules.Pooling"  # matched by class name
    st = read_sentence_transformers(_write(tmp_path, [TRANSFORMER, _pooling(newer)], pooling, 512))
    assert st.pooling == PoolingConfig(mode, normalize=False)
    assert st.max_seq_length == 512


def test_no_sentence_bert_config_leaves_the_length_open(tmp_path):
    st = read_sentence_transformers(_write(tmp_path, [TRANSFORMER, _pooling()], {"pooling_mode": "cls"}))
    assert st.max_seq_length is None


@pytest.mark.parametrize(("modules", "pooling", "match"), [
    ([TRANSFORMER, _pooling(), {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}],
     {"pooling_mode": "mean"}, "'Dense' module, which is not supported"),
    ([TRANSFORMER], None, "lists no Pooling module"),
    ([TRANSFORMER, _pooling()], {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, "exactly one"),
    ([TRANSFORMER, _pooling()], {"pooling_mode_mean_tokens": False}, "exactly one"),
    ([TRANSFORMER, _pooling()], {"pooling_mode": "weightedmean"}, "weighted-mean"),
    ([TRANSFORMER, _pooling()], {"pooling_mode": "bogus"}, "'bogus' is not supported"),
    ([TRANSFORMER, _pooling()], {"pooling_mode": "lasttoken", "include_prompt": False}, "include_prompt"),
])
def test_unsupported_pipelines_are_refused(tmp_path, modules, pooling, match):
    with pytest.raises(SentenceTransformersError, match=match):
        read_sentence_transformers(_write(tmp_path, modules, pooling))


def test_missing_pooling_config_and_modules_json(tmp_path):
    with pytest.raises(SentenceTransformersError, match="no modules.json"):
        read_sentence_transformers(tmp_path)
    _write(tmp_path, [TRANSFORMER, _pooling()], None)
    with pytest.raises(SentenceTransformersError, match="cannot read"):
        read_sentence_transformers(tmp_path)


def test_dense_module_is_a_start_up_error(tmp_path, minilm_dir):
    """``serve.preflight`` refuses it before any weight loads (``main`` prints it and exits 2)."""
    from jaxserve.config_loading import load_config
    from jaxserve.serve import preflight

    d = tmp_path / "minilm-dense"
    shutil.copytree(minilm_dir, d, ignore=shutil.ignore_patterns("*.safetensors"))
    modules = json.loads((d / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (d / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"^modules.json entry 2 \('2_Dense'\) is a 'Dense' module, which is not "
                       "supported; supported: Transformer, Pooling, Normalize$"):
        preflight(load_config(["--model", str(d)]))
    assert preflight(load_config(["--model", str(minilm_dir)])).task == "embed"
    assert preflight(load_config(["--model", str(minilm_dir), "--runner", "pooling"])).task == "embed"
