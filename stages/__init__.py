"""The stage table: the one place that lists the stages, and the Python API.

    from stages import run
    from stages.mine import MineConfig
    out = run(MineConfig(run="runs/x", data="ann.json", student="openai/clip-vit-base-patch32"))   # -> runs/x/mine

Each row names a verb, the module that holds its config class and `run(config)` entry point, its directory
under RUN/ and the stages it reads. The CLI, `status` and the demo read this table; adding a stage is one row
(plus its module). A stage module is imported only when its verb runs, so `status` and `--help` stay light.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Stage:
    verb: str                     # the CLI verb
    module: str                   # holds `CONFIG` (a dataclass) and `run(config)`
    config: str                   # name of the config class in that module
    directory: str                # its output under RUN/
    upstream: tuple[str, ...]     # verbs whose output it reads
    help: str

    def load(self) -> tuple[type, Callable[[Any], Any]]:
        """(config class, entry point): imports the stage and its heavy dependencies."""
        module = importlib.import_module(self.module)
        return getattr(module, self.config), module.run

    def run(self, config_file: str | None = None, section: str | None = None, **values: Any) -> Path:
        """Resolve a config (defaults < YAML < values, plug-in options flat as on the command line) and run the
        stage; returns its output folder. `section`: the verb whose section of a pipeline file to read."""
        config, entry = self.prepare(config_file, section, **values)
        return entry(config)

    def prepare(self, config_file: str | None = None, section: str | None = None,
                **values: Any) -> tuple[Any, Callable[[Any], Any]]:
        """(config, entry point) as `run` resolves them, the config also passed through the stage module's
        `check(config)` if it has one (the rules that relate options), so that every stage of a plan can be
        checked before the first one runs."""
        from pipeline.config import resolve

        cls, entry = self.load()
        config = resolve(cls, config_file, values, section, VERBS)
        check = getattr(importlib.import_module(self.module), "check", None)
        if check is not None:
            check(config)
        return config, entry


STAGES: tuple[Stage, ...] = (
    Stage("mine", "stages.mine", "MineConfig", "mine", (),
          "Embed the corpus with the student and mine the top-k hard negatives of every query (RUN/mine)."),
    Stage("train-teacher", "stages.train_teacher", "TrainTeacherConfig", "teacher-train", ("mine",),
          "Fine-tune the cross-encoder teacher on the run's corpus, with the student's mined hard negatives "
          "(RUN/teacher-train; optional)."),
    Stage("score-teacher", "stages.score_teacher", "ScoreTeacherConfig", "teacher", ("mine",),
          "Score every mined pair and every positive with the cross-encoder teacher (RUN/teacher)."),
    Stage("distill", "stages.distill", "DistillConfig", "distill", ("score-teacher",),
          "Train the student: contrastive loss + distillation over the teacher-ranked hard negatives (RUN/distill)."),
    Stage("evaluate", "stages.evaluate", "EvalConfig", "eval", ("distill",),
          "Recall@1/5/10 in both directions and RSUM of a dual encoder, optionally re-ranked by the teacher, with "
          "student-teacher rank agreement (RUN/eval)."),
)

BY_VERB = {s.verb: s for s in STAGES}
VERBS = tuple(BY_VERB)   # the sections a pipeline file may have


def stage(verb: str) -> Stage:
    return BY_VERB[verb]


def run(config: Any) -> Path:
    """Run the stage that `config` (a stage's config dataclass) belongs to; returns its output folder.

    Unset plug-in options (distill's `loss_options`) take the chosen plug-in's defaults; the rules, errors and
    artifact contract are those of the command line.
    """
    from pipeline.config import complete

    for s in STAGES:
        if type(config).__module__ == s.module and type(config).__name__ == s.config:
            return s.load()[1](complete(config))
    raise TypeError(f"{type(config).__name__} is not the config of a stage "
                    f"({', '.join(s.module + '.' + s.config for s in STAGES)})")
