"""The tokenizer and chat template of a GGUF file, rebuilt from its metadata without torch.

A GGUF carries no ``tokenizer.json``: its vocabulary, merges, token types, special-token ids and
chat template are metadata under llama.cpp's key names. transformers turns those into a fast
tokenizer (``integrations/gguf/gguf_tokenizer_mapping.py``: the byte-level BPE of GPT-2/SmolLM2,
Qwen2's split regex, sentencepiece, ...) but reads the file with a reader that imports torch.
Here the ``gguf`` package reads the metadata (the reader the weight loader already opened) and
transformers' own conversion builds the tokenizer, so the result is the one
``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` gives (a test checks ids, decoding and chat
template against it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

from jaxserve.weights.gguf_reader import open_gguf

# transformers' names for the special tokens and the metadata keys holding their ids.
_SPECIAL_TOKEN_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def tokenizer_metadata(metadata: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tokenizer_dict, tokenizer_config)`` from a file's ``tokenizer.*`` metadata, as transformers'
    ``get_gguf_tokenizer`` groups them (the first feeds the conversion, the second the wrapper)."""
    grouped = {
        group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to sentencepiece vocabularies
        config.setdefault("add_bos_token", True)
    elif tokenizer_dict.get("tokenizer_type") == "gemma4":  # its chat template writes <bos> itself
        config["add_bos_token"] = False
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = metadata.get(key)
        config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
    return tokenizer_dict, config


def load_gguf_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """The fast tokenizer (with its chat template) described by the GGUF file at ``path``."""
    checkpoint = open_gguf(path)
    metadata = {key: checkpoint.field(key) for key in checkpoint.reader.fields if key.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError(f"{path} has no tokenizer in its metadata (tokenizer.ggml.tokens); pass --tokenizer DIR")
    tokenizer_dict, config = tokenizer_metadata(metadata)
    backend, extra = convert_gguf_tokenizer(checkpoint.arch, tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=str(path), **config, **extra)
