"""`cprd-pipeline loop`: LoopITR's loop, offline, in rounds of the ordinary stages.

Round r, in RUN/round-r/:
  mine            with the given student (round 1) or round r-1's distilled student
  train-teacher   (when the pipeline file has a `train-teacher:` section) from the given teacher (round 1) or
                  round r-1's fine-tuned one, on this round's mined negatives
  score-teacher   with the given teacher, or this round's fine-tuned one
  distill         from this round's mining student (so training continues round to round)
  evaluate        (with an `evaluate:` section) the distilled student; the starting student once, in RUN/eval-start

Every stage of every round is resolved and checked before the first one runs, so a bad key or value anywhere in
the pipeline file fails with nothing written. Every stage keeps the artifact contract, so a killed loop resumes
where it stopped and a finished round is never recomputed. The pipeline file holds one section per verb (`mine:`,
`score-teacher:`, ...) over shared top-level options (`device:` ...); the loop sets each stage's `run`, the
students and the teachers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pipeline.artifacts import read_json
from pipeline.config import check_choices, flags, load_yaml, option, option_name, runtime, section_of, suggest
from pipeline.errors import PipelineError
from pipeline.log import make_log, make_result
from stages import STAGES, VERBS, stage

SET_BY_LOOP = {"run", "run_dir", "out"}    # per stage; students and teachers are checked below


@dataclass
class LoopConfig:
    run: str = runtime(None, "root folder: rounds go to RUN/round-1, RUN/round-2, ...")
    rounds: int = option(2, "rounds to run (a later call with more rounds continues)", at_least=1)
    pipeline: Optional[str] = runtime(None, "the pipeline file: a section per verb (mine:, train-teacher:, "
                                            "score-teacher:, distill:, evaluate:) over shared top-level options")
    device: Optional[str] = runtime(None, "auto | cpu | cuda (default: the pipeline file's `device:`, else auto)",
                                    choices=("auto", "cpu", "cuda"))
    force: bool = runtime(False, "let each stage replace an output made with other settings (and keep one that is up "
                                 "to date)")


def sections(path: Path) -> dict[str, dict[str, Any]]:
    """Each verb's section of the pipeline file over its shared top-level options, as the stage reads it
    (`config.section_of`; the stage itself then drops the shared options it does not have), checked for what the
    loop sets."""
    raw = load_yaml(path)
    known_anywhere = {f.name for s in STAGES for f in flags(s.load()[0])}
    unknown = [k for k in raw if k not in VERBS and option_name(k) not in known_anywhere]
    if unknown:
        raise PipelineError(f"{path}: top-level option '{unknown[0]}' belongs to no verb "
                            f"({suggest(unknown[0], known_anywhere | set(VERBS), raw)})")
    out = {verb: {option_name(k): v for k, v in section_of(raw, verb, VERBS, path).items()}
           for verb in VERBS if verb in raw}
    for verb, values in out.items():
        clash = SET_BY_LOOP & set(values)
        if clash:
            raise PipelineError(f"{path}: `{verb}: {sorted(clash)[0]}` is set by the loop (each round's folder); "
                                "remove it")
    for need in ("mine", "score-teacher"):
        if need not in out:
            raise PipelineError(f"{path}: no `{need}:` section (the loop needs mine, score-teacher and distill)")
    if "student" not in out["mine"] or "teacher" not in out["score-teacher"]:
        raise PipelineError(f"{path}: `mine: student` and `score-teacher: teacher` are required (round 1's models)")
    if "student" in out.get("distill", {}):   # its own section's or a top-level one, which distill would read
        raise PipelineError(f"{path}: distill's `student` is set by the loop (the round's mining student); give round "
                            "1's student as `mine: student`")
    return out


def schedule(plan: dict[str, dict[str, Any]], root: Path, rounds: int) -> list[tuple[int, str, dict[str, Any]]]:
    """(round, verb, the values the loop sets over the verb's section) of every stage the loop runs, in order;
    round 0 is the starting student's evaluation."""
    steps: list[tuple[int, str, dict[str, Any]]] = []
    if "evaluate" in plan:   # the starting point, for the per-round table
        steps.append((0, "evaluate", {"model": plan["mine"]["student"], "out": str(root / "eval-start")}))
    for r in range(1, rounds + 1):
        here, before = str(root / f"round-{r}"), root / f"round-{r - 1}"
        student = plan["mine"]["student"] if r == 1 else str(before / "distill" / "final")
        steps.append((r, "mine", {"run": here, "student": student}))
        teacher = plan["score-teacher"]["teacher"]
        if "train-teacher" in plan:
            base = plan["train-teacher"].get("teacher", teacher) if r == 1 else str(before / "teacher-train" / "final")
            steps.append((r, "train-teacher", {"run": here, "teacher": base}))
            teacher = "train-teacher"
        steps += [(r, "score-teacher", {"run": here, "teacher": teacher}), (r, "distill", {"run": here})]
        if "evaluate" in plan:
            steps.append((r, "evaluate", {"run": here}))
    return steps


def run(cfg: LoopConfig) -> Path:
    check_choices(cfg)
    if not cfg.run or not cfg.pipeline:
        raise PipelineError("loop needs --run and --config (the pipeline file)")
    log = make_log(True)
    path = Path(cfg.pipeline)
    plan = sections(path)
    root = Path(cfg.run)
    common = {"replace": cfg.force, **({"device": cfg.device} if cfg.device else {})}   # a flag beats the file
    # every stage resolved (the file's section for the verb, under the loop's values) and checked before any runs
    ready = [(r, verb, *stage(verb).prepare(str(path), section=verb, **common, **values))
             for r, verb, values in schedule(plan, root, cfg.rounds)]
    for r, verb, config, entry in ready:
        if verb == "mine":
            log(f"[loop] round {r} of {cfg.rounds}: {root / f'round-{r}'}")
        entry(config)
    if "evaluate" in plan:
        make_result(True)("\n" + summary(root, cfg.rounds))
    return root


def summary(root: Path, rounds: int) -> str:
    """RSUM per round (and the starting student), from each round's RUN/round-r/eval/metrics.json."""
    lines = ["| round | student | RSUM | change | teacher re-rank RSUM |", "| --- | --- | --- | --- | --- |"]
    start = read_json(root / "eval-start" / "metrics.json")
    previous = start["rsum"] if start else None
    if start:
        rerank = f"{start['rerank']['rsum']:.1f}" if "rerank" in start else ""
        lines.append(f"| 0 | the starting student | {start['rsum']:.1f} | | {rerank} |")
    for r in range(1, rounds + 1):
        m = read_json(root / f"round-{r}" / "eval" / "metrics.json")
        if m is None:
            lines.append(f"| {r} | not evaluated | | | |")
            continue
        change = f"{m['rsum'] - previous:+.1f}" if previous is not None else ""
        rerank = f"{m['rerank']['rsum']:.1f}" if "rerank" in m else ""
        lines.append(f"| {r} | round-{r}/distill/final | {m['rsum']:.1f} | {change} | {rerank} |")
        previous = m["rsum"]
    return "\n".join(lines)
