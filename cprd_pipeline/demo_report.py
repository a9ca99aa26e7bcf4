"""The demo's comparison table (report.md): one row per model or teacher re-rank, mean ± sd over seeds.

Rows are found by name (`student`, `teacher`, the baseline method's), never by position; the corpus's facts
(combinations, held-out ones, captions per image) come from the corpus generator (pipeline/demo/corpus.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from pipeline.demo.corpus import DemoCorpusSpec, captions, combinations

from .demo_recipe import Recipe

KS = (1, 5, 10)
STUDENT, TEACHER = "student", "teacher"   # the names of the rows every report has (the teacher check's)


@dataclass
class Row:
    """One line of the report: a model (or a teacher re-rank) and its metrics, one dict per seed."""
    name: str          # a recipe method's name, or student / teacher / teacher-itm / teacher-ft
    label: str
    runs: list[dict]
    seeded: bool = True


@dataclass
class Setting:
    """What the table's text says of the run: the recipe as run, its corpus, the split and the models."""
    recipe: Recipe               # after --quick and --corpus-seed (Recipe.for_run)
    spec: DemoCorpusSpec
    split: str
    n_galleries: int
    meta: dict                   # assets.json, with `student` and `teacher` described
    quick: bool = False
    full: bool = False


def _cell(values: list[float], digits: int = 1) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _tau(m: dict) -> float:
    """Kendall's tau with the teacher over the top k_test, mean of both directions."""
    return (m["agreement"]["i2t"]["kendall_tau"] + m["agreement"]["t2i"]["kendall_tau"]) / 2


def _versus(runs: list[dict], ref: list[dict]) -> str:
    """Mean RSUM difference to the reference rows and that difference in pooled standard deviations."""
    a, b = [m["rsum"] for m in runs], [m["rsum"] for m in ref]
    diff = np.mean(a) - np.mean(b)
    if len(a) < 2 or len(b) < 2:
        return f"{diff:+.1f}"
    pooled = np.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2)
    return f"{diff:+.1f} ({diff / pooled:+.1f} sd)" if pooled > 0 else f"{diff:+.1f}"


def _per_gallery(runs: list[dict], ref: list[dict]) -> str:
    """Each gallery's RSUM difference to the reference (both averaged over seeds), then their mean ± standard
    error over galleries: '+8.9 / +0.2 / +3.0 (+4.0 ± 2.6)'. The galleries are draws of images, so this error
    holds the part of the uncertainty that the seeds' pooled sd leaves out."""
    d = np.mean([m["rsum_per_gallery"] for m in runs], axis=0) - np.mean([m["rsum_per_gallery"] for m in ref], axis=0)
    return " / ".join(f"{x:+.1f}" for x in d) + f" ({d.mean():+.1f} ± {d.std(ddof=1) / np.sqrt(len(d)):.1f})"


def _rsum(row: Row) -> float:
    return float(np.mean([m["rsum"] for m in row.runs]))


def _line(r: Row, baseline: Optional[Row]) -> str:
    """The row's table line: recall, RSUM, `vs none`, rank agreement, false negatives, images encoded."""
    cells = [_cell([m[d][f"R@{k}"] for m in r.runs]) for d in ("i2t", "t2i") for k in KS]
    seeds = str(len(r.runs)) if r.seeded else "-"
    versus = _versus(r.runs, baseline.runs) if (baseline and r.seeded and r is not baseline) else ""
    tau = _cell([_tau(m) for m in r.runs], 3) if "agreement" in r.runs[0] else ""
    fn = f"{np.mean([m['false_negatives_per_epoch'] for m in r.runs]):,.0f}" if r.seeded else ""
    by_margin = np.mean([m.get("dropped_by_margin_per_epoch", 0) for m in r.runs]) if r.seeded else 0
    fn += f" + {by_margin:,.0f} by margin" if by_margin else ""
    encoded = (f"{np.mean([m['images_encoded_per_epoch'] for m in r.runs]):,.0f} "
               f"({100 * np.mean([m['in_batch_share'] for m in r.runs]):.0f}%)"
               if r.seeded and "images_encoded_per_epoch" in r.runs[0] else "")
    return (f"| {r.label} | {seeds} | " + " | ".join(cells) + f" | {_cell([m['rsum'] for m in r.runs])} | "
            f"{versus} | {tau} | {fn} | {encoded} |\n")


def _table(rows: list[Row], baseline: Optional[Row]) -> str:
    head = ("| method | seeds | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | RSUM | vs none | "
            "Kendall tau | false neg. / epoch | images encoded / epoch (lists in-batch) |\n" + "| --- " * 13 + "|\n")
    return head + "".join(_line(r, baseline) for r in rows)


def _notes(s: Setting, rows: dict[str, Row]) -> list[str]:
    notes = []
    if s.quick:
        notes.append("**Quick mode**: a small corpus and a few steps; the numbers only show that every path runs.")
    if rows[TEACHER].runs[0]["rsum"] <= rows[STUDENT].runs[0]["rsum"]:
        notes.append("**The teacher does not beat the student here** (--allow-weak-teacher): distilling it is not "
                     "expected to help.")
    if s.split == "val":
        notes.append("**Validation split**: for choosing settings; the README's table is the test split.")
    if s.full:
        notes.append("**--full**: `round 2` students start from their round-1 student (same seed) and train on "
                     "negatives that student mined, scored by the same teacher; the fine-tuned teacher was trained "
                     "on the round-1 student's mined negatives of the train split (settings in the recipe's `full` "
                     "block, set a priori).")
    return notes


def _length(distill: dict) -> str:
    """How long a distilled student trains: the recipe's max_steps (--quick) or epochs."""
    return f"{distill['max_steps']} steps" if "max_steps" in distill else f"{distill.get('epochs', 1)} epoch(s)"


def _intro(s: Setting) -> str:
    r, m, spec = s.recipe, s.meta, s.spec
    return (
        f"Corpus seed {spec.seed}, split `{s.split}`: {s.n_galleries} galleries of one image per shape combination "
        f"({len(combinations())} each, {spec.held_out} of them never seen in training, "
        f"{len(captions(combinations()[0]))} captions per image), each evaluated alone; Recall@K in percent, "
        "averaged over the galleries, then mean ± sample standard deviation over seeds. The student is the demo's "
        f"tiny CLIP ({m['student']}, pre-trained on {m['student_images']:,} images), the teacher its tiny BLIP "
        f"({m['teacher']} per tower, on {m['teacher_images']:,} images), scored as ITM log-odds + "
        f"{m['itc_weight']:g} x ITC cosine (the weight chosen on a separate validation split). Distilled "
        f"students start from the same student and train {_length(r.distill)} on the teacher cache of the train "
        f"split ({spec.train_images:,} images, top-{r.mine.k} mined negatives per query) with itc + "
        f"{r.distill.get('distill_weight', 1.0)} x the distillation loss (a method may override). `vs none`: mean "
        f"RSUM difference to the baseline `{r.baseline}`, and in pooled standard deviations. `Kendall tau`: "
        f"agreement of the student's order with the teacher's scores over each query's top {r.evaluate.k_test} "
        "(mean of both directions). `false neg.`: mined candidates dropped per epoch because they match the query "
        "(identical caption text, or the same image); `+ N by margin`: those a method's `max_teacher_margin` drops "
        "as well (the teacher scores them above the positive). `images encoded / epoch`: what the student's image "
        "tower encoded in training, the cost of its steps (a list entry outside its batch's pairs is encoded too, "
        "unless the lists are cut to the batch), and the share of list entries that were queries or positives of "
        "their own batch.\n\n")


def _closing(s: Setting, rows: list[Row], teacher_rsum: float, baseline: Optional[Row]) -> str:
    """The per-gallery differences to the baseline, and the share of the teacher's gap the best student closes."""
    others = [r for r in rows if r.seeded and r is not baseline]
    text = ""
    if baseline and others and s.n_galleries > 1:
        text += ("`vs none` on each gallery alone (mean over seeds), then mean ± standard error over the "
                 "galleries, which counts the draw of test images that the pooled sd over seeds does not: " +
                 "; ".join(f"{r.label} {_per_gallery(r.runs, baseline.runs)}" for r in others) + ".\n\n")
    best = max(others, key=_rsum, default=None)
    if baseline and best:
        # on the galleries the teacher's row covers: a gap between numbers over different images means nothing
        n = s.recipe.evaluate.reference_on(s.n_galleries)
        on = lambda row: float(np.mean([np.mean(m["rsum_per_gallery"][:n]) for m in row.runs]))
        base = on(baseline)
        share = (on(best) - base) / (teacher_rsum - base) if teacher_rsum > base else float("nan")
        some = "" if n >= s.n_galleries else (" on the first gallery, the one the teacher re-ranked" if n == 1 else
                                              f" on the first {n} galleries, the ones the teacher re-ranked")
        text += (f"The best distilled student ({best.label}) closes {100 * share:.1f}% of the RSUM gap between "
                 f"the baseline and the teacher re-rank{some}" + (" (negative: it ends below the baseline)"
                                                                  if share < 0 else "") + ".\n\n")
    return text


def report(rows: list[Row], s: Setting, seconds: float) -> str:
    """report.md: notes, what the numbers are, the table, the per-gallery differences and the gap closed."""
    by_name = {r.name: r for r in rows}
    baseline = next((r for r in rows if r.seeded and r.name == s.recipe.baseline), None)
    return ("# cprd-pipeline demo\n\n" + "".join(n + "\n\n" for n in _notes(s, by_name)) + _intro(s)
            + _table(rows, baseline) + "\n" + _closing(s, rows, by_name[TEACHER].runs[0]["rsum"], baseline)
            + f"Total time {seconds / 60:.1f} min. Pictures: report/index.html. Raw numbers: report.json and "
              "eval/*/metrics.json.\n")
