"""Typed stage configs: dataclass defaults < `--config FILE.yaml` < CLI flags.

Fields marked `runtime=True` (batch size, device, workers ...) change how a stage runs but not what it
produces, so they are kept out of the fingerprint. A `location` (where a model or corpus is: a folder, a file)
is kept out too: the stage puts what is there into its identity instead (the files' hashes), so the same files
under another path, or the same command from another working directory, are the same input. Everything else is
part of the stage's identity.

A numeric field declares its range where it is declared (`at_least=`, `above=`, `at_most=`); `resolve` and
`complete` check every range and choice, so a bad value fails before a stage writes anything, whether it came
from a flag, a YAML file or Python.

A `choice_options` field holds the options of whichever plug-in another field chooses (distill's `--loss`):
each plug-in declares its own options dataclass, every plug-in's options are flags and YAML keys, and the
resolved config keeps only the chosen plug-in's, so only those enter the fingerprint. The choosing field's
choices are the plug-ins the provider knows when asked (a plug-in registered after the config class was defined
is one). What ranges cannot say, an options dataclass says in an optional `check(self)` method, raising
`OptionError(field, problem)`; `resolve` and `complete` call it and name the option as its flag, with the file
it came from.
"""
from __future__ import annotations

import dataclasses
import difflib
import operator
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from .errors import PipelineError


BOUNDS = {"at_least": (">=", operator.ge), "above": (">", operator.gt), "at_most": ("<=", operator.le)}


class OptionError(PipelineError):
    """What is wrong with one option of an options dataclass, raised by its `check(self)`: `option` is the field's
    name; `resolve` and `complete` report it as `--option: problem`, after the file the value came from."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"--{option.replace('_', '-')}: {problem}")
        self.option, self.problem = option, problem


def _bounds(**given: Any) -> dict[str, Any]:
    return {k: v for k, v in given.items() if v is not None}


def runtime(default: Any, help: str = "", choices: tuple[str, ...] | None = None, *, at_least: Any = None,
            above: Any = None, at_most: Any = None) -> Any:
    """A config field that does not change the stage's output (excluded from the fingerprint)."""
    return dataclasses.field(default=default, metadata={"runtime": True, "help": help, "choices": choices,
                                                        "bounds": _bounds(at_least=at_least, above=above,
                                                                          at_most=at_most)})


def location(default: Any, help: str = "") -> Any:
    """Where an input is (a model folder or hub name, an annotation file). Not fingerprinted: the stage records the
    input's content (model_identity, Corpus.content_hash) in its identity instead."""
    return dataclasses.field(default=default, metadata={"runtime": True, "location": True, "help": help,
                                                        "choices": None})


def option(default: Any = dataclasses.MISSING, help: str = "", choices: tuple[str, ...] | None = None,
           added: bool = False, *, at_least: Any = None, above: Any = None, at_most: Any = None) -> Any:
    """A config field that is part of the stage's identity.

    added: an option introduced after outputs were made without it; it enters the fingerprint only when set to
    something other than its default, so those outputs stay up to date.
    at_least / above / at_most: the range of a numeric option (None, an unset optional, is always accepted).
    """
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "added": added,
                                                        "bounds": _bounds(at_least=at_least, above=above,
                                                                          at_most=at_most)})


def bounds_text(field: dataclasses.Field) -> str:
    """A field's range as `>= 1`, `> 0, <= 1` ('' for none)."""
    return ", ".join(f"{BOUNDS[k][0]} {v}" for k, v in field.metadata.get("bounds", {}).items())


def out_of_range(field: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with `value` for the field's declared range, or None if it is inside (or None)."""
    if value is None or isinstance(value, bool):
        return None
    for key, bound in field.metadata.get("bounds", {}).items():
        sign, ok = BOUNDS[key]
        if not ok(value, bound):
            return f"must be {sign} {bound}, got {value}"
    return None


def choice_options(selector: str, provider: Callable[[], Mapping[str, type]], help: str = "") -> Any:
    """A field holding the options dataclass of the plug-in that field `selector` names.

    provider() maps each choice to its options dataclass (fields made with `option`).
    """
    return dataclasses.field(default=None, metadata={"choice_options": (selector, provider), "help": help})


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line option / YAML key of a config class."""
    name: str
    type: Any
    default: Any
    help: str
    choices: tuple[str, ...] | None
    owners: tuple[str, ...] = ()   # for plug-in options: the choices that own it
    required: bool = False         # declared `str` (not Optional) with no default: the stage refuses to run without it
    bounds: str = ""               # its range, e.g. `>= 1`


def choices_of(cls: type, field: dataclasses.Field) -> tuple[str, ...] | None:
    """A field's choices: for the field that chooses a plug-in, every plug-in its provider knows now (one
    registered after the class was defined included); else those it declares."""
    for f in dataclasses.fields(cls):
        if f.metadata.get("choice_options", (None,))[0] == field.name:
            return tuple(f.metadata["choice_options"][1]())
    return field.metadata.get("choices")


def flags(cls: type) -> list[Flag]:
    """Every option of a config class, plug-in options included (each listed once, with its owners)."""
    hints = typing.get_type_hints(cls)
    out: list[Flag] = []
    for f in dataclasses.fields(cls):
        if "choice_options" in f.metadata:
            _, provider = f.metadata["choice_options"]
            merged: dict[str, Flag] = {}
            for owner, opts in provider().items():
                ohints = typing.get_type_hints(opts)
                for of in dataclasses.fields(opts):
                    default = of.default if of.default is not dataclasses.MISSING else None
                    prev = merged.get(of.name)
                    if prev and (prev.type != ohints[of.name] or prev.default != default
                                 or prev.bounds != bounds_text(of)):
                        raise TypeError(f"{cls.__name__}: option '{of.name}' is declared differently by "
                                        f"{prev.owners[0]} and {owner}")
                    merged[of.name] = Flag(of.name, ohints[of.name], default, of.metadata.get("help", ""),
                                           of.metadata.get("choices"), (prev.owners if prev else ()) + (owner,),
                                           bounds=bounds_text(of))
            out.extend(merged.values())
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
            required = default is None and type(None) not in typing.get_args(hints[f.name])
            out.append(Flag(f.name, hints[f.name], default, f.metadata.get("help", ""), choices_of(cls, f),
                            required=required, bounds=bounds_text(f)))
    return out


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
    if tp in (int, float) and isinstance(value, str):  # YAML reads `1e-4` as a string
        try:
            return tp(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise PipelineError(f"{source}: option '{name}' expects {tp.__name__}, got {value!r}")
    return value


def option_name(key: Any) -> str:
    """A YAML key or flag spelling (`max-steps`) as the config field it sets (`max_steps`)."""
    return str(key).replace("-", "_")


def suggest(key: Any, names: Any, file_keys: Any = ()) -> str:
    """`did you mean 'num-negatives'?` for an unknown key, or the list of known names when none is close; names
    are spelled as the file spells its keys (hyphens or underscores)."""
    key = str(key)
    hyphens = "-" in key or ("_" not in key and any("-" in str(k) for k in file_keys))
    spelled = sorted({n.replace("_", "-") if hyphens else n.replace("-", "_") for n in names})
    close = difflib.get_close_matches(key, spelled, n=1)
    return f"did you mean '{close[0]}'?" if close else f"known: {', '.join(spelled)}"


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping, or a one-line error naming the file."""
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise PipelineError(f"--config: file not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise PipelineError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise PipelineError(f"--config {path}: expected a mapping of option: value")
    return loaded


def section_of(loaded: dict[str, Any], section: str | None, sections: tuple[str, ...], path: Path) -> dict[str, Any]:
    """One verb's options from a config file: a flat file as it is; a pipeline file (keys that are verbs, e.g.
    `mine:`, `distill:`) gives that verb's section over the file's top-level options (`run:`, `device:` ...)."""
    if section is None or not any(k in sections for k in loaded):
        return loaded
    own = loaded.get(section) or {}
    if not isinstance(own, dict):
        raise PipelineError(f"--config {path}: section '{section}' must be a mapping of option: value")
    return {**{k: v for k, v in loaded.items() if k not in sections}, **own}


def resolve(cls: type, config_file: str | Path | None, cli: Mapping[str, Any], section: str | None = None,
            sections: tuple[str, ...] = ()) -> Any:
    """Build `cls` from defaults, then the YAML file, then every CLI value that is not None.

    With `section` (the verb) and `sections` (every verb), a pipeline file's section for that verb is used;
    top-level options of such a file that this verb does not have are left to the verbs that do.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = {fl.name: fl for fl in flags(cls)}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_file:
        path = Path(config_file)
        raw = load_yaml(path)
        loaded = section_of(raw, section, sections, path)
        shared = set(raw) - set(sections) if loaded is not raw else set()
        in_section = (raw.get(section) or {}) if loaded is not raw else {}
        for key, value in loaded.items():
            name = option_name(key)
            if name not in known and key in shared and key not in in_section:
                continue   # a top-level option of a pipeline file that another verb has
            where = f"--config {path}" + (f" ({section}:)" if key in in_section else "")
            if name not in known:
                raise PipelineError(f"{where}: unknown option '{key}' ({suggest(key, known, loaded)})")
            values[name] = _coerce(key, value, known[name].type, where)
            sources[name] = where
    for name, value in cli.items():
        if value is not None:
            values[name] = _coerce(name, value, known[name].type, "command line")
            sources[name] = "command line"
    # plug-in options: keep the chosen plug-in's, refuse another plug-in's
    for name, f in fields.items():
        if "choice_options" not in f.metadata:
            continue
        selector, provider = f.metadata["choice_options"]
        choice = values.get(selector, fields[selector].default)
        owned = provider()
        opts_cls = owned.get(choice)
        own = {o.name for o in dataclasses.fields(opts_cls)} if opts_cls else set()
        given = {n: values.pop(n) for n in list(values) if known[n].owners}
        for n in given:
            if n not in own:
                raise PipelineError(f"{sources[n]}: --{n.replace('_', '-')} is an option of "
                                    f"{' / '.join(known[n].owners)}, not of --{selector} {choice}")
        if opts_cls is not None:
            values[name] = opts_cls(**given)
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in values]
    if missing:
        raise PipelineError(f"missing required option(s): {', '.join('--' + m.replace('_', '-') for m in missing)}")
    config = cls(**values)
    check_choices(config, sources)
    return config


def complete(config: Any) -> Any:
    """A config built in Python, made whole as `resolve` makes one: an unset plug-in options field gets the
    chosen plug-in's defaults, options of another plug-in are refused, and every choice is checked."""
    for f in dataclasses.fields(config):
        if "choice_options" not in f.metadata:
            continue
        selector, provider = f.metadata["choice_options"]
        choice, value = getattr(config, selector), getattr(config, f.name)
        opts_cls = provider().get(choice)
        if value is None and opts_cls is not None:
            config = dataclasses.replace(config, **{f.name: opts_cls()})
        elif value is not None and type(value) is not opts_cls:
            raise PipelineError(f"{f.name}: {type(value).__name__} is not the options of {selector} '{choice}' "
                                f"({opts_cls.__name__ if opts_cls else 'it takes none'})")
    check_choices(config)
    return config


def _where(name: str, sources: Mapping[str, str] | None) -> str:
    """`--config FILE: ` when the value of option `name` came from a file, else ''."""
    where = (sources or {}).get(name, "command line")
    return "" if where == "command line" else f"{where}: "


def check_choices(config: Any, sources: Mapping[str, str] | None = None) -> None:
    """Every field's choices and declared range, nested plug-in options included, then a nested options
    dataclass's own `check(self)` (what ranges cannot say); `sources` (field -> where its value came from) names
    the file of a value that came from one."""
    for f in dataclasses.fields(config):
        choices, value = choices_of(type(config), f), getattr(config, f.name)
        problem = out_of_range(f, value)
        if choices and value is not None and value not in choices:
            problem = f"'{value}' is not one of {', '.join(choices)}"
        if problem:
            raise PipelineError(_where(f.name, sources) + f"--{f.name.replace('_', '-')}: {problem}")
        if dataclasses.is_dataclass(value):
            check_choices(value, sources)
            if callable(getattr(value, "check", None)):
                try:
                    value.check()
                except OptionError as e:
                    raise PipelineError(_where(e.option, sources) + str(e)) from None


def as_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def fingerprinted(config: Any) -> dict[str, Any]:
    """The part of a config that defines the stage's output (nested option dataclasses, such as a loss's, alike)."""
    return {f.name: fingerprinted(v) if dataclasses.is_dataclass(v := getattr(config, f.name)) else v
            for f in dataclasses.fields(config) if not f.metadata.get("runtime")
            and not (f.metadata.get("added") and getattr(config, f.name) == f.default)}


def render(config: Any) -> str:
    """The resolved config as YAML, as printed at the start of a stage."""
    return yaml.safe_dump(as_dict(config), sort_keys=False, default_flow_style=False).rstrip()
