"""The distillation-loss registry: a name maps to a loss, the batch fields it reads and the options it owns.

Each loss file registers itself:

    @dataclass
    class KLOptions:
        teacher_temperature: float = option(1.0, "teacher scores are divided by this", above=0)   # its range

    @register("kl", KLOptions, "the teacher's softmax distribution")
    def kl(x: DistillInputs, o: KLOptions) -> torch.Tensor:
        return kl_loss(x.student, x.teacher, x.mask, o.teacher_temperature)

A loss returns one scalar, or a dict of named scalars when it is a sum of several terms (the distillation term
is their sum; the loop logs each as `distill/NAME`). `distill` looks the name up and never branches on it; only
the chosen loss's options enter its config and fingerprint. Every module of this package is imported when the
registry is first read, so adding a loss is one file (plus its tests).

The options dataclass validates itself: each numeric option declares its range (`option(..., above=0)`), and
what a range cannot say (options that depend on each other) goes in an optional method

        def check(self) -> None:   # raise pipeline.config.OptionError("option_name", "what is wrong")

which `config.resolve` / `config.complete` call for the chosen loss before anything runs; the loss function
itself then takes its options as given.

A loss may live outside this package: a module that calls `register` the same way, imported before the stage
runs (Python: import it, then `stages.run(...)`; command line: name it in the environment variable
`CPRD_LOSS_MODULES`, comma-separated importable modules, which the registry imports when it is read, and
nothing else does). Its name and options then appear in `distill --help` and are flags and YAML keys as any other's.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..errors import PipelineError


@dataclass(frozen=True)
class DistillInputs:
    """One micro-batch of B queries with N mined hard negatives each, as every distillation loss sees it.

    | field            | shape  | meaning                                                                |
    | ---------------- | ------ | ---------------------------------------------------------------------- |
    | student          | [B, N] | student logits of the hard negatives: logit_scale * cos(query, cand)   |
    | teacher          | [B, N] | teacher scores of the same pairs (raw log-odds, or itm+itc)            |
    | mask             | [B, N] | bool, True = a real negative (False: padding, or a dropped false negative) |
    | student_positive | [B]    | student logit of the query's positive used this epoch                  |
    | teacher_positive | [B]    | teacher score of that positive                                         |
    """

    student: torch.Tensor
    teacher: torch.Tensor
    mask: torch.Tensor
    student_positive: torch.Tensor
    teacher_positive: torch.Tensor

    def rows(self, keep: torch.Tensor) -> "DistillInputs":
        """The rows where the bool [B] `keep` is True, every field alike."""
        return DistillInputs(*(getattr(self, f.name)[keep] for f in dataclasses.fields(self)))

    def with_positive(self) -> "DistillInputs":
        """The positive prepended to the list with its teacher score: column 0 of [B, N + 1], always real.

        This is LoopITR's list (the positive and a few hard negatives); the listwise losses then place the
        positive wherever the teacher's score puts it.
        """
        b = self.student.shape[0]
        return dataclasses.replace(
            self,
            student=torch.cat([self.student_positive[:, None], self.student], 1),
            teacher=torch.cat([self.teacher_positive[:, None].to(self.teacher.dtype), self.teacher], 1),
            mask=torch.cat([torch.ones(b, 1, dtype=torch.bool, device=self.mask.device), self.mask], 1),
        )


def named_terms(value: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A loss's return value as named terms: a lone scalar is {"distill": it}."""
    return dict(value) if isinstance(value, dict) else {"distill": value}


@dataclass
class NoOptions:
    """A loss with nothing to set."""


@dataclass(frozen=True)
class DistillLoss:
    name: str
    fn: Optional[Callable[[DistillInputs, Any], Any]]   # a scalar or {name: scalar}; None: no term (the baseline)
    options: type                                                 # a dataclass of this loss's own options
    summary: str
    uses_teacher: bool = True


_REGISTRY: dict[str, DistillLoss] = {}
_LOADED = False
MODULES_VARIABLE = "CPRD_LOSS_MODULES"   # comma-separated modules outside this package that register losses


def register(name: str, options: type = NoOptions, summary: str = "", uses_teacher: bool = True):
    """Decorator: register `fn(inputs: DistillInputs, options) -> scalar tensor | {name: scalar}` under `name`."""
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"register({name!r}): options must be a dataclass, got {options!r}")

    def decorate(fn):
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"distillation loss {name!r} is registered twice")
        _REGISTRY[name] = DistillLoss(name, fn, options, summary, uses_teacher)
        return fn

    return decorate


def unregister(name: str) -> None:
    """Remove a registered loss (a loss registered from outside the package, when its module is done with)."""
    _REGISTRY.pop(name, None)


def _load_all() -> None:
    """Import every module of this package once, so that each registers its losses; then the modules named in
    CPRD_LOSS_MODULES (an import is a no-op for a module already imported)."""
    global _LOADED
    if not _LOADED:
        from . import __path__ as package_path

        for info in pkgutil.iter_modules(package_path):
            if not info.name.startswith("_") and info.name != "registry":
                importlib.import_module(f"{__package__}.{info.name}")
        _LOADED = True
    for module in filter(None, (m.strip() for m in os.environ.get(MODULES_VARIABLE, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise PipelineError(f"{MODULES_VARIABLE}: cannot import {module!r} ({e}); it must be importable "
                                "from PYTHONPATH") from None


def names() -> tuple[str, ...]:
    _load_all()
    return tuple(sorted(_REGISTRY))


def get(name: str) -> DistillLoss:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown distillation loss {name!r} (known: {', '.join(names())})")
    return _REGISTRY[name]


def options_by_loss() -> dict[str, type]:
    """Each loss's options dataclass, for the CLI and the config resolver."""
    _load_all()
    return {name: spec.options for name, spec in sorted(_REGISTRY.items())}
