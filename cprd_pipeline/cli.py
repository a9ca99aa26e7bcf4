"""`cprd-pipeline`: one verb per stage of the stage table, plus `status`, `demo` and `demo-assets`.

Options come from each stage's config dataclass. Precedence: dataclass defaults < `--config FILE.yaml` < flags
given on the command line. A stage's module (and torch, FAISS, transformers with it) is imported only when its
verb runs or its `--help` is asked for.
"""
from __future__ import annotations

import contextlib
import sys
import typing
from pathlib import Path
from typing import Any, Callable

import click

from pipeline.errors import PipelineError
from stages import STAGES, VERBS, Stage

APP_VERBS = {  # verbs that are not stages: their help line for the command list, without importing them
    "demo": "The whole pipeline on the bundled demo corpus and models; writes OUT/report.md (see README: make demo).",
    "demo-assets": "Train the demo's student and teacher from scratch and pack them (about 35 minutes on 2 CPU cores).",
    "loop": "LoopITR's loop in rounds: mine with the last round's student, optionally fine-tune the teacher, score, "
            "distill, evaluate (RUN/round-N).",
    "report": "Pictures and tables of a run (score distributions, rank agreement, training curves, recall): "
              "RUN/report/index.html and report.md.",
    "status": "Each stage's state, and every other stage output under RUN: absent, partial (n/m shards), complete, "
              "damaged, or stale (an input stage, image or model file changed since).",
}


def _click_type(tp: Any, choices: tuple[str, ...] | None) -> Any:
    if choices:
        return click.Choice(choices)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    tp = args[0] if args else tp
    return {int: int, float: float, str: str, bool: bool}.get(tp, str)


def config_options(cls: type) -> Callable:
    """Add one click option per config option (default None, so unset flags do not override YAML)."""
    from pipeline.config import flags

    def decorate(fn: Callable) -> Callable:
        for f in reversed(flags(cls)):
            flag = "--" + f.name.replace("_", "-")
            help_text = ("[required] " if f.required else "") + (f"[{', '.join(f.owners)}] " if f.owners else "") + f.help
            if f.default is not None and f.default != "":
                help_text += f"  [default: {str(f.default).lower() if isinstance(f.default, bool) else f.default}]"
            if f.bounds:
                help_text += f"  [{f.bounds}]"
            if f.type is bool:
                fn = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text)(fn)
            else:
                names = [flag] + (["--run-dir"] if f.name == "run" else [])  # torchrun's parser takes --run
                fn = click.option(*names, f.name, type=_click_type(f.type, f.choices), default=None,
                                  help=help_text)(fn)
        return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                            help="YAML file of options, or a pipeline file with a section per verb (mine:, distill:, ...) "
                                 "over shared top-level options; flags given here override it")(fn)

    return decorate


def _run(cls: type, entry: Callable, config_file: str | None, values: dict[str, Any], verb: str | None = None) -> None:
    from pipeline.config import resolve

    _call(lambda: entry(resolve(cls, config_file, values, section=verb, sections=VERBS)))


def _call(fn: Callable, *args: Any) -> None:
    """Run fn(*args): a PipelineError is one `error:` line and exit 2; Ctrl-C says how to resume."""
    try:
        fn(*args)
    except PipelineError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:  # storage: disk full, read-only, a file removed under a running stage
        text = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else (str(e).strip().splitlines() or [repr(e)])[0]
        click.echo(f"error: {text}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)


def _stage_command(stage: Stage) -> click.Command:
    cls, entry = stage.load()

    @click.command(stage.verb, help=stage.help)
    @config_options(cls)
    def command(config_file: str | None, **values: Any) -> None:
        _run(cls, entry, config_file, values, stage.verb)

    return command


class UsageLine(click.ClickException):
    """A usage error (unknown option or verb, bad choice, bad type, missing option) shown as the tool's other errors
    are: one `error:` line and exit 2, not click's usage block."""
    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


@contextlib.contextmanager
def _one_line_usage(group: click.Context | None = None):
    """A UsageError as a UsageLine naming the verb (the group's context knows it when the verb's own parse fails)."""
    try:
        yield
    except click.UsageError as e:
        verb = e.ctx.info_name if e.ctx is not None and e.ctx.parent is not None else None
        verb = verb or (group.invoked_subcommand if group is not None else None)
        raise UsageLine((f"{verb}: " if verb else "") + " ".join(e.format_message().split())) from None


class Verbs(click.Group):
    """Commands built on first use: the command list comes from the table, not from importing every stage."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _one_line_usage():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_usage(ctx):
            return super().invoke(ctx)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        from pipeline.config import suggest

        if args and not args[0].startswith("-") and args[0] not in self.list_commands(ctx):
            ctx.fail(f"no such command '{args[0]}' ({suggest(args[0], self.list_commands(ctx))})")
        return super().resolve_command(ctx, args)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(VERBS) + sorted(APP_VERBS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        for s in STAGES:
            if s.verb == name:
                try:   # building the options may import plug-ins (CPRD_LOSS_MODULES): one line if one fails
                    return _stage_command(s)
                except PipelineError as e:
                    raise UsageLine(str(e)) from None
        return {"demo": _demo_command, "demo-assets": demo_assets, "loop": loop, "report": report,
                "status": status}.get(name, lambda: None)()

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(s.verb, s.help.split(" (RUN/")[0]) for s in STAGES] + sorted(APP_VERBS.items())
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=Verbs, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="cprd-pipeline")
def main() -> None:
    """Distil a cross-encoder teacher into a dual-encoder student for image-text retrieval.

    \b
    Stages (each reads the outputs of the stages before it from RUN/ and can be rerun alone):
      mine           embed the corpus with the student, mine top-k hard negatives  -> RUN/mine
      train-teacher  (optional) fine-tune the teacher on the student's hard negatives -> RUN/teacher-train
      score-teacher  score every mined pair with the cross-encoder teacher         -> RUN/teacher
      distill        train the student: contrastive loss + CPRD over the teacher's ranking -> RUN/distill
      evaluate       Recall@1/5/10 both directions, RSUM, rank agreement           -> RUN/eval
      report         pictures and tables of whatever the run holds                 -> RUN/report
    A rerun with the same settings skips finished work and remakes what changed inputs made stale (as make
    does); different settings are refused unless --force, which starts a stage over.
    """


def _demo_command() -> click.Command:
    from .demo import DemoConfig, run

    @click.command("demo", help=APP_VERBS["demo"])
    @config_options(DemoConfig)
    def command(config_file: str | None, **values: Any) -> None:
        _run(DemoConfig, run, config_file, values)

    return command


def demo_assets() -> click.Command:
    @click.command("demo-assets", help=APP_VERBS["demo-assets"])
    @click.option("--out", default="data/demo", show_default=True, type=click.Path(file_okay=False),
                  help="where the packed models go")
    @click.option("--work", default="runs/demo-assets", show_default=True, type=click.Path(file_okay=False),
                  help="scratch folder (corpus, full models, validation results)")
    @click.option("--seed", default=0, show_default=True, type=int)
    @click.option("--student-size", default="64x2", show_default=True,
                  help="the student's width x layers (a student-size study: e.g. 128x4)")
    @click.option("--teacher-from", type=click.Path(file_okay=False, exists=True),
                  help="reuse the packed teacher of this assets folder (e.g. data/demo): train only a student")
    def command(out: str, work: str, seed: int, student_size: str, teacher_from: str | None) -> None:
        from pipeline.demo.models import build_assets

        try:
            hidden, layers = (int(x) for x in student_size.lower().split("x"))
        except ValueError:
            click.echo(f"error: --student-size {student_size!r}: expected WIDTHxLAYERS, e.g. 128x4", err=True)
            sys.exit(2)
        build_assets(Path(out), Path(work), seed=seed, student_size=dict(hidden=hidden, layers=layers, heads=4),
                     teacher_from=Path(teacher_from) if teacher_from else None)

    return command


def loop() -> click.Command:
    @click.command("loop", help=APP_VERBS["loop"] + " Each stage keeps the artifact contract: a killed loop resumes "
                   "where it stopped, a finished round is never recomputed, and more --rounds continue.")
    @click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="root folder of the rounds")
    @click.option("--config", "pipeline", required=True, type=click.Path(dir_okay=False),
                  help="pipeline file: a section per verb (mine:, train-teacher:, score-teacher:, distill:, "
                       "evaluate:) over shared top-level options")
    @click.option("--rounds", default=2, show_default=True, type=int, help="rounds to run")
    @click.option("--device", default=None, type=click.Choice(("auto", "cpu", "cuda")),
                  help="every stage's device  [default: the pipeline file's `device:`, else auto]")
    @click.option("--force/--no-force", default=False, show_default=True,
                  help="let each stage replace an output made with other settings")
    def command(run_dir: str, pipeline: str, rounds: int, device: str | None, force: bool) -> None:
        from .rounds import LoopConfig, run

        _call(run, LoopConfig(run=run_dir, rounds=rounds, pipeline=pipeline, device=device, force=force))

    return command


def report() -> click.Command:
    @click.command("report", help=APP_VERBS["report"] + " Sections whose stage has not run are named, with what to run.")
    @click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="run directory")
    @click.option("--out", type=click.Path(file_okay=False), help="output folder  [default: RUN/report]")
    @click.option("--max-queries", default=20000, show_default=True, type=click.IntRange(min=1),
                  help="queries per direction sampled for the score distributions")
    def command(run_dir: str, out: str | None, max_queries: int) -> None:
        from pipeline.report import build, write

        if not Path(run_dir).is_dir():
            click.echo(f"error: {run_dir}: no such run directory", err=True)
            sys.exit(2)
        path = write(build(Path(run_dir), max_queries=max_queries), Path(out or Path(run_dir) / "report"),
                     f"cprd-pipeline report: {run_dir}")
        click.echo(f"[report] {path}")

    return command


def status() -> click.Command:
    @click.command("status", help=APP_VERBS["status"])
    @click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="run directory")
    def command(run_dir: str) -> None:
        from pipeline.status import StageDir, describe

        if not Path(run_dir).is_dir():
            click.echo(f"error: {run_dir}: no such run directory", err=True)
            sys.exit(2)
        table = [StageDir(s.verb, s.directory, s.upstream) for s in STAGES]
        # a loop's root: one block per round
        rounds = sorted((p for p in Path(run_dir).glob("round-*") if p.is_dir() and p.name[6:].isdigit()),
                        key=lambda p: int(p.name[6:]))
        try:
            blocks = [(f"{p.name}:", describe(p, table)) for p in rounds] or [("", describe(Path(run_dir), table))]
        except PipelineError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        for head, lines in blocks:
            if head:
                click.echo(head)
            for line in lines:
                click.echo(("  " if head else "") + line)

    return command


if __name__ == "__main__":
    main()
