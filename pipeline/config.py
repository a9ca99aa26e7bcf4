"""Typed stage configs: dataclass defaults < `--config FILE.yaml` < CLI flags.

Fields marked `runtime=True` (batch size, device, workers ...) change how a stage runs but not what it
produces, so they are kept out of the fingerprint. Everything else is part of the stage's identity.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import PipelineError


def runtime(default: Any, help: str = "", choices: tuple[str, ...] | None = None) -> Any:
    """A config field that does not change the stage's output (excluded from the fingerprint)."""
    return dataclasses.field(default=default, metadata={"runtime": True, "help": help, "choices": choices})


def option(default: Any = dataclasses.MISSING, help: str = "", choices: tuple[str, ...] | None = None) -> Any:
    """A config field that is part of the stage's identity."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def _coerce(name: str, value: Any, annotation: Any, source: str) -> Any:
    """Check a YAML/CLI value against the field's type; ints are accepted where floats are expected."""
    if value is None:
        return None
    tp = annotation
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else tp
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise PipelineError(f"{source}: option '{name}' expects {tp.__name__}, got {value!r}")
    return value


def resolve(cls: type, config_file: str | Path | None, cli: Mapping[str, Any]) -> Any:
    """Build `cls` from defaults, then the YAML file, then every CLI value that is not None."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise PipelineError(f"--config: file not found: {path}") from None
        except yaml.YAMLError as e:
            raise PipelineError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise PipelineError(f"--config {path}: expected a mapping of option: value")
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            if name not in fields:
                raise PipelineError(f"--config {path}: unknown option '{key}' (known: {', '.join(sorted(fields))})")
            values[name] = _coerce(name, value, hints[name], f"--config {path}")
    for name, value in cli.items():
        if value is not None:
            values[name] = _coerce(name, value, hints[name], "command line")
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in values]
    if missing:
        raise PipelineError(f"missing required option(s): {', '.join('--' + m.replace('_', '-') for m in missing)}")
    config = cls(**values)
    check_choices(config)
    return config


def check_choices(config: Any) -> None:
    for f in dataclasses.fields(config):
        choices, value = f.metadata.get("choices"), getattr(config, f.name)
        if choices and value is not None and value not in choices:
            raise PipelineError(f"--{f.name.replace('_', '-')}: '{value}' is not one of {', '.join(choices)}")


def as_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def fingerprinted(config: Any) -> dict[str, Any]:
    """The part of a config that defines the stage's output."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if not f.metadata.get("runtime")}


def render(config: Any) -> str:
    """The resolved config as YAML, as printed at the start of a stage."""
    return yaml.safe_dump(as_dict(config), sort_keys=False, default_flow_style=False).rstrip()
