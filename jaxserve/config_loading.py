"""Where a ``ServeConfig``'s values come from: defaults < YAML (``--config``) < CLI flags.

The flags are generated from ``ServeConfig``'s fields (one flag per field, vLLM's names); a YAML
``models:`` list gives one config per served model over the shared top level.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from jaxserve.config import ConfigError, ServeConfig

FIELDS = {f.name: f for f in dataclasses.fields(ServeConfig)}


def _base_type(tp: Any) -> Any:
    """``int | None`` -> int; ``list[str] | None`` -> list[str]."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return args[0]
    return tp


_TYPES = typing.get_type_hints(ServeConfig)


def _coerce(name: str, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, with an error naming the key."""
    tp = _base_type(_TYPES[name])
    if value is None:
        return None
    try:
        if typing.get_origin(tp) is dict:
            value = json.loads(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise TypeError
            return value
        if typing.get_origin(tp) is list:
            if isinstance(value, str):
                value = json.loads(value) if value.strip().startswith("[") else [value]
            if not isinstance(value, list):
                raise TypeError
            return [json.dumps(v) if isinstance(v, dict) else str(v) for v in value]
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise TypeError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if tp is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError, json.JSONDecodeError):
        raise ConfigError(f"{name}: {value!r} is not a valid {getattr(tp, '__name__', tp)}") from None


def config_from_dict(values: dict[str, Any]) -> ServeConfig:
    """Build a ServeConfig from YAML-style keys (dashes or underscores)."""
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(FIELDS)}")
        kwargs[name] = _coerce(name, value)
    return ServeConfig(**kwargs)


def build_arg_parser() -> argparse.ArgumentParser:
    """One flag per ``ServeConfig`` field (``--max-model-len``), each defaulting to None (unset)."""
    p = argparse.ArgumentParser(
        prog="python -m jaxserve.serve",
        description="Serve a model with an OpenAI-compatible API.",
    )
    p.add_argument(
        "--config", help="YAML file whose keys are the flags below (CLI flags override it); a bare name "
        f"such as qwen.yaml that is not a file here is one of the shipped configs ({', '.join(shipped_configs())})."
    )
    for f in dataclasses.fields(ServeConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(_TYPES[f.name])
        help_text = f.metadata["help"]
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(tp) is list:
            p.add_argument(flag, nargs="+", default=None, help=help_text)
        else:
            p.add_argument(flag, default=None, help=help_text, metavar=f.name.upper())
    p.add_argument("--disable-log-requests", dest="enable_log_requests", action="store_const", const=False,
                   help="Do not log requests (the default; vLLM's older flag).")
    return p


def shipped_configs() -> list[str]:
    """Names of the configs installed with the package (``configs/`` in the repository)."""
    return sorted(p.name for p in resources.files("jaxserve.configs").iterdir() if p.name.endswith(".yaml"))


def find_config(name: str) -> Path:
    """``name`` as a path if that file exists, else a shipped config of that bare name."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.name == name:  # a bare name: look in the shipped configs
        shipped = resources.files("jaxserve.configs") / name
        if shipped.is_file():
            return Path(str(shipped))
        raise ConfigError(
            f"config file {name!r} not found: no {path.resolve()} and no shipped config of that name "
            f"(shipped: {', '.join(shipped_configs())})"
        )
    raise ConfigError(f"config file {name!r} not found: {path.resolve()} does not exist")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with path.open() as fh:
            loaded = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read it as YAML: {' '.join(str(e).split())}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    return loaded


# With a YAML ``models:`` list, these are the process's (top level only); the rest may differ per model.
SERVER_KEYS = (
    "host", "port", "ssl_keyfile", "ssl_certfile", "api_key", "allowed_origins", "allowed_methods", "allowed_headers",
    "allow_credentials",
    "max_request_body_bytes", "shutdown_timeout", "log_level", "disable_uvicorn_access_log", "disable_log_stats",
    "compilation_cache_dir", "num_processes", "process_id", "coordinator_address",
)
ENTRY_KEYS = ("model", "served_model_name", "task", "runner", "convert", "pooling", "tokenizer")  # per entry only


def load_config(argv: list[str] | None = None) -> ServeConfig:
    """The one model's config (``load_configs`` for a YAML with a ``models:`` list)."""
    configs = load_configs(argv)
    if len(configs) != 1:
        raise ConfigError(f"expected one model, the config lists {len(configs)}")
    return configs[0]


def load_configs(argv: list[str] | None = None) -> list[ServeConfig]:
    """One config per served model: defaults < YAML top level < a ``models:`` entry < CLI flags;
    ``$JAXSERVE_API_KEY`` adds to ``api_key``. Without ``models:`` the YAML and flags are one model."""
    args = build_arg_parser().parse_args(argv)
    shared: dict[str, Any] = {}
    entries = None
    if args.config:
        loaded = _read_yaml(find_config(args.config))
        entries = loaded.pop("models", None)
        shared.update({k.replace("-", "_"): v for k, v in loaded.items()})
    cli: dict[str, Any] = {}
    for name in FIELDS:
        v = getattr(args, name)
        if v is not None:
            cli[name] = v[0] if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str) and v[0].startswith("[") else v
    env_key = os.environ.get("JAXSERVE_API_KEY")
    if env_key:
        keys = _coerce("api_key", cli.get("api_key", shared.get("api_key"))) or []
        cli["api_key"] = keys + [env_key]
    if entries is None:
        return [config_from_dict({**shared, **cli})]
    return _model_list(entries, shared, cli)


def _model_list(entries: Any, shared: dict[str, Any], cli: dict[str, Any]) -> list[ServeConfig]:
    """The configs of a YAML ``models:`` list (names unique; server keys only at the top level)."""
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ConfigError("models: expected a non-empty list of mappings (name, model, task, limits)")
    misplaced = [k for k in ENTRY_KEYS if k in shared or k in cli]
    if misplaced:
        raise ConfigError(f"{misplaced[0]}: with a models: list it is set in each entry, not at the top level or on "
                          "the command line")
    configs, seen = [], set()
    for i, entry in enumerate(entries):
        entry = {k.replace("-", "_"): v for k, v in entry.items()}
        name, aliases = entry.pop("name", None), entry.pop("aliases", None) or []
        if not isinstance(name, str) or not name or not isinstance(aliases, list):
            raise ConfigError(f"models[{i}]: needs a 'name' (and 'aliases' as a list, if any)")
        server = [k for k in entry if k in SERVER_KEYS]
        if server:
            raise ConfigError(f"models[{i}] ({name}): {server[0]} is a server setting; set it at the top level")
        names = [name, *map(str, aliases)]
        clash = next((n for n in names if n in seen), None)
        if clash is not None:
            raise ConfigError(f"models[{i}]: the name {clash!r} is used by two models")
        seen.update(names)
        configs.append(config_from_dict({**shared, **entry, **cli, "served_model_name": names}))
    if len(configs) > 1 and configs[0].num_processes > 1:
        raise ConfigError("models: several models in a multi-host launch are not supported")
    return configs
