"""`cprd-pipeline`: one verb per stage. Options come from each stage's config dataclass.

Precedence: dataclass defaults < `--config FILE.yaml` < flags given on the command line.
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Callable

import click

from .errors import PipelineError


def _click_type(tp: Any, choices: tuple[str, ...] | None) -> Any:
    if choices:
        return click.Choice(choices)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    tp = args[0] if args else tp
    return {int: int, float: float, str: str, bool: bool}.get(tp, str)


def config_options(cls: type) -> Callable:
    """Add one click option per dataclass field (default None, so unset flags do not override YAML)."""
    hints = typing.get_type_hints(cls)

    def decorate(fn: Callable) -> Callable:
        for f in reversed(dataclasses.fields(cls)):
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else None
            help_text = f.metadata.get("help", "")
            if default not in (None, False, ""):
                help_text += f"  [default: {default}]"
            tp = hints[f.name]
            if tp is bool:
                fn = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text)(fn)
            else:
                names = [flag] + (["--run-dir"] if f.name == "run" else [])  # torchrun's parser takes --run
                fn = click.option(*names, f.name, type=_click_type(tp, f.metadata.get("choices")), default=None,
                                  help=help_text)(fn)
        return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                            help="YAML file of options (flags given here override it)")(fn)

    return decorate


def _run_stage(cls: type, entry: Callable, config_file: str | None, values: dict[str, Any]) -> None:
    from .config import resolve

    try:
        entry(resolve(cls, config_file, values))
    except PipelineError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="cprd-pipeline")
def main() -> None:
    """Distil a cross-encoder teacher into a dual-encoder student for image-text retrieval.

    \b
    Stages (each reads the one before it from RUN/ and can be rerun alone):
      mine           embed the corpus with the student, mine top-k hard negatives  -> RUN/mine
      score-teacher  score every mined pair with the cross-encoder teacher         -> RUN/teacher
      distill        train the student: contrastive loss + CPRD over the teacher's ranking -> RUN/distill
      evaluate       Recall@1/5/10 both directions and RSUM                          -> RUN/eval
    A rerun with the same settings skips finished work; different settings are refused unless --force.
    """


def _stage_command(name: str, module: str, cls_name: str, doc: str) -> None:
    import importlib

    mod = importlib.import_module(module)
    cls = getattr(mod, cls_name)

    @main.command(name, help=doc)
    @config_options(cls)
    def command(config_file: str | None, **values: Any) -> None:
        _run_stage(cls, mod.run, config_file, values)


_stage_command("mine", "stages.mine", "MineConfig",
               "Embed the corpus with the student and mine the top-k hard negatives of every query (RUN/mine).")
_stage_command("score-teacher", "stages.score_teacher", "TeacherConfig",
               "Score every mined pair and every positive with the cross-encoder teacher (RUN/teacher).")

_stage_command("distill", "stages.distill", "DistillConfig",
               "Train the student: contrastive loss + distillation over the teacher-ranked hard negatives "
               "(RUN/distill).")

_stage_command("evaluate", "stages.evaluate", "EvalConfig",
               "Recall@1/5/10 in both directions and RSUM of a dual encoder, optionally re-ranked by the teacher "
               "(RUN/eval).")

_stage_command("demo", "stages.demo", "DemoConfig",
               "The whole pipeline on the bundled demo corpus and models; writes OUT/report.md "
               "(see README: make demo).")


@main.command("demo-assets")
@click.option("--out", default="data/demo", show_default=True, type=click.Path(file_okay=False),
              help="where the packed models go")
@click.option("--work", default="runs/demo-assets", show_default=True, type=click.Path(file_okay=False),
              help="scratch folder (corpus, full models, validation results)")
@click.option("--seed", default=0, show_default=True, type=int)
def demo_assets(out: str, work: str, seed: int) -> None:
    """Train the demo's student and teacher from scratch and pack them (about 35 minutes on 2 CPU cores)."""
    from .demo.models import build_assets

    build_assets(Path(out), Path(work), seed=seed)


@main.command("status")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="run directory")
def status(run_dir: str) -> None:
    """Each stage's state: absent, partial (n/m shards), complete, or stale (its input changed since)."""
    from .status import describe

    for line in describe(Path(run_dir)):
        click.echo(line)


if __name__ == "__main__":
    main()
