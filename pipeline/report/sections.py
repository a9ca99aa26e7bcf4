"""The report's sections: each a title, Markdown text (paragraphs and pipe tables) and figures, built from what
`read` found; a section whose stage has not run says what to run instead. `build` assembles them in order."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..artifacts import read_jsonl
from ..metrics import KS, kendall_tau
from .discover import Found, discover
from .figures import LEGEND_SIZE, figure as _figure, png as _png, rsum_figure, training_figure
from .read import MAX_QUERIES, Cache, Evaluation, prob_views, read_caches, read_evaluations


@dataclass
class Section:
    key: str
    title: str
    text: str = ""                                   # Markdown: paragraphs and tables
    figures: list[tuple[str, bytes]] = field(default_factory=list)   # (caption, PNG bytes)
    missing: Optional[str] = None                    # why the section is empty, and what to run


def _moments(x: np.ndarray) -> dict[str, float]:
    """Mean, std, skewness and excess kurtosis (0 for a normal distribution)."""
    mu, sd = float(x.mean()), float(x.std())
    z = (x - mu) / (sd if sd > 0 else 1.0)
    return {"mean": mu, "std": sd, "skew": float((z ** 3).mean()), "kurtosis": float((z ** 4).mean() - 3)}


def _sample_note(caches: list[Cache]) -> str:
    sampled = [f"`{c.label}` {d} {len(v.student):,} of {v.total:,}"
               for c in caches for d, v in c.dirs.items() if len(v.student) < v.total]
    return " Sampled: " + ", ".join(sampled) + " queries." if sampled else ""


def _table(header: list[str], rows: list[str]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + rows)


def scores_section(caches: list[Cache]) -> Section:
    from matplotlib.ticker import MaxNLocator

    rows, figures = [], []
    for c in caches:
        fig, axes = _figure(len(c.dirs), 2)
        for row, (d, v) in enumerate(c.dirs.items()):
            for col, (who, x, color) in enumerate(((f"teacher ({c.score})", v.teacher, "tab:red"),
                                                   ("student (cosine)", v.student, "tab:blue"))):
                ax = axes[row][col]
                ax.hist(x.ravel(), bins=60, color=color, alpha=0.8)
                ax.xaxis.set_major_locator(MaxNLocator(6))   # narrow score ranges print long tick labels
                ax.set_title(f"{d}: {who} scores of hard negatives")
                m = _moments(x.ravel())
                rows.append(f"| {c.label} | {d} | {who} | {m['mean']:.3f} | {m['std']:.3f} | {m['skew']:+.2f} | "
                            f"{m['kurtosis']:+.2f} |")
        figures.append((f"{c.label}: score distributions per direction", _png(fig, c.label)))
    text = ("Per teacher cache: the teacher's and the student's (cosine at mining time) scores of the same mined hard "
            f"negatives.{_sample_note(caches)} Compare the shapes: where the teacher's scores are concentrated or "
            "skewed and the student's near-normal (the CPRD paper's first finding), matching raw scores transfers "
            "poorly and matching the teacher's ranking does better.\n\n"
            + _table(["teacher cache", "direction", "model", "mean", "std", "skew", "excess kurtosis"], rows))
    return Section("scores", "Teacher and student scores of the hard negatives", text, figures)


def positives_section(caches: list[Cache]) -> Section:
    rows, figures = [], []
    for c in caches:
        fig, axes = _figure(1, len(c.dirs))
        for col, (d, v) in enumerate(c.dirs.items()):
            pos = np.concatenate(v.positives) if v.positives else np.empty(0)
            # share of (negative, positive) pairs of a query where the negative scores higher, averaged over queries
            above = np.array([(v.teacher[q][:, None] > p[None, :]).mean() for q, p in enumerate(v.positives) if len(p)])
            ax = axes[0][col]
            bins = np.histogram_bin_edges(np.concatenate([v.teacher.ravel(), pos]), bins=60)
            ax.hist(v.teacher.ravel(), bins=bins, alpha=0.6, density=True, label="hard negatives", color="tab:gray")
            ax.hist(pos, bins=bins, alpha=0.6, density=True, label="positives", color="tab:green")
            ax.set_title(f"{d}: teacher scores ({c.score})")
            ax.legend(fontsize=LEGEND_SIZE)
            rows.append(f"| {c.label} | {d} | {len(v.positives):,} | {pos.mean():.3f} | {v.teacher.mean():.3f} | "
                        f"{100 * above.mean():.1f}% |")
        figures.append((f"{c.label}: teacher scores of positives and hard negatives", _png(fig, c.label)))
    text = ("Per teacher cache. `negatives above the positive`: of a query's (hard negative, positive) pairs, the "
            "share where the teacher scores the negative higher, averaged over queries; these are likely false "
            "negatives (distill's `--max-teacher-margin` drops them).\n\n"
            + _table(["teacher cache", "direction", "queries", "positive: mean teacher score", "hard negative: mean",
                      "negatives above the positive"], rows))
    return Section("positives", "Positives and hard negatives under the teacher", text, figures)


def agreement_section(caches: list[Cache], evaluations: list["Evaluation"]) -> Section:
    text, figures, rows = "", [], []
    for c in caches:
        fig, axes = _figure(1, len(c.dirs))
        for col, (d, v) in enumerate(c.dirs.items()):
            tau = kendall_tau(v.student, v.teacher)
            tau = tau[np.isfinite(tau)]
            axes[0][col].hist(tau, bins=40, range=(-1, 1), color="tab:purple")
            axes[0][col].axvline(tau.mean(), color="k", linestyle="--", label=f"mean {tau.mean():.3f}")
            axes[0][col].set_title(f"{d}: Kendall tau per query, at mining time")
            axes[0][col].legend(fontsize=LEGEND_SIZE)
            rows.append(f"| {c.label} | {d} | {v.student.shape[1]} | {tau.mean():.3f} | {np.median(tau):.3f} | "
                        f"{100 * (tau < 0).mean():.1f}% |")
        figures.append((f"{c.label}: per-query Kendall tau at mining time", _png(fig, c.label)))
    if caches:
        text += ("At mining time, per teacher cache: Kendall's tau-b between the student's and the teacher's scores of "
                 f"each query's mined candidates.{_sample_note(caches)}\n\n"
                 + _table(["teacher cache", "direction", "candidates", "mean Kendall tau", "median", "share below 0"],
                          rows) + "\n\n")
    evaluated = [e for e in evaluations if e.metrics.get("agreement")]
    if evaluated:
        names = list(evaluated[0].metrics["agreement"]["i2t"])
        text += ("Evaluated students: the same agreement over each test query's top `k_test` candidates (mean over "
                 "queries).\n\n| evaluation | model | " + " | ".join(f"i2t {n}" for n in names) + " | "
                 + " | ".join(f"t2i {n}" for n in names) + " |\n| --- | --- |" + " --- |" * (2 * len(names)) + "\n")
        for e in evaluated:
            a = e.metrics["agreement"]
            text += (f"| {e.label} | {e.model} | " + " | ".join(f"{a[d][n]:.3f}" for d in ("i2t", "t2i") for n in names)
                     + " |\n")
    elif caches:
        text += "No evaluation in this run was made with a teacher (`evaluate --rerank-teacher`), so none has an agreement.\n"
    return Section("agreement", "Student-teacher rank agreement", text, figures)


# keys of metrics.jsonl that are counts or positions, not curves
TRAINING_SKIP = {"step", "epoch", "false_negatives", "dropped_by_margin", "negatives", "negatives_in_batch"}


def training_section(students: list[Found], root: Path) -> Section:
    runs = [(s, read_jsonl(s.path / "metrics.jsonl")) for s in students]
    runs = [(s, rows) for s, rows in runs if rows]
    if not runs:
        return Section("training", "Training", missing="no distilled student with metrics.jsonl "
                                                       "(run `cprd-pipeline distill --run RUN`)")
    keys: list[str] = []
    for _, rows in runs:
        for r in rows:
            keys += [k for k in r if k not in TRAINING_SKIP and k not in keys and isinstance(r[k], (int, float))]
    val_keys = [k for k in keys if k.startswith("val_")]
    lines = ["| " + " | ".join(["student", "state", "steps", "last loss"] + val_keys) + " |",
             "|" + " --- |" * (4 + len(val_keys))]
    for s, rows in runs:
        val = [next((r[k] for r in reversed(rows) if k in r), None) for k in val_keys]   # the last of each
        cells = [s.label(root), "complete" if s.complete else "in progress", str(rows[-1]["step"]),
                 f"{rows[-1].get('loss', float('nan')):.4f}"] + ["" if v is None else f"{v:.3f}" for v in val]
        lines.append("| " + " | ".join(cells) + " |")
    text = ("Per optimizer step, from each student's `metrics.jsonl`: every named loss term (the loop's sum is "
            "`loss`), the learning rate and the student's logit scale" +
            (", what each step encoded (`images_encoded`, `texts_encoded`: unique images and captions) and the share "
             "of list entries whose image or caption was a query or positive of the same batch (`in_batch_share`)"
             if "in_batch_share" in keys else "") +
            (", and the validation metrics (`val_*`)" if any(k.startswith("val_") for k in keys) else "") +
            ".\n\n" + "\n".join(lines))
    fig = training_figure([(s.label(root), rows) for s, rows in runs], keys)
    return Section("training", "Training", text, [("training curves", _png(fig))])


def evaluations_section(evaluations: list[Evaluation], figure: bool = True) -> Section:
    if not evaluations:
        return Section("evaluations", "Evaluations", missing="no finished evaluation "
                                                             "(run `cprd-pipeline evaluate --run RUN --data TEST`)")
    base = {e.corpus: e.metrics["rsum"] for e in evaluations if e.starting}
    head = ("| evaluation | model | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | RSUM | "
            "vs starting student |\n" + "| --- " * 10 + "|\n")
    body, bars = "", []
    for e in evaluations:
        for suffix, m in (("", e.metrics), (" + teacher re-rank", e.metrics.get("rerank"))):
            if not m:
                continue
            cells = " | ".join(f"{m[d][f'R@{k}']:.1f}" for d in ("i2t", "t2i") for k in KS)
            delta = f"{m['rsum'] - base[e.corpus]:+.1f}" if e.corpus in base else "no starting-student evaluation"
            if e.starting and not suffix:
                delta = "(the starting student)"
            body += f"| {e.label}{suffix} | {e.model} | {cells} | {m['rsum']:.1f} | {delta} |\n"
            bars.append((e.label + suffix, m["rsum"]))
    text = ("Recall@K in percent, both directions; `vs starting student`: RSUM change against the evaluation of "
            "the student that mined the run, on the same test data.\n\n" + head + body)
    if not base:
        text += ("\nThe starting student has no evaluation here: run `cprd-pipeline evaluate --model STUDENT "
                 "--data TEST --out RUN/eval-student` to get the column.\n")
    figures = [("RSUM per evaluation", _png(rsum_figure(bars)))] if figure else []
    return Section("evaluations", "Evaluations", text, figures)


def build(root: Path, extra: Optional[list[Section]] = None, max_queries: int = MAX_QUERIES) -> list[Section]:
    """Every section, in order; `extra` (e.g. the demo's comparison table) goes first."""
    root = Path(root)
    found = discover(root)
    mines = [f for f in found.get("mine", []) if f.complete]
    students = found.get("distill", [])
    evaluations = read_evaluations(found.get("evaluate", []), mines, students, root)
    sections = list(extra or [])
    teachers = [f for f in found.get("teacher", []) if f.complete]
    caches = read_caches(teachers, root, max_queries)
    unfinished = [f.label(root) for f in found.get("teacher", []) if not f.complete]
    if caches:
        drawn = caches + prob_views(caches, teachers, students, root)   # also as read by --teacher-scale prob
        sections += [scores_section(drawn), positives_section(drawn)]
        if unfinished:
            sections[-2].text += ("\n\nUnfinished teacher caches (drawn once complete): "
                                  + ", ".join(f"`{u}`" for u in unfinished) + ".")
    else:
        hint = "no finished teacher cache (run `cprd-pipeline score-teacher --run RUN`)"
        hint += f"; unfinished: {', '.join(unfinished)}" if unfinished else ""
        sections += [Section("scores", "Teacher and student scores of the hard negatives", missing=hint),
                     Section("positives", "Positives and hard negatives under the teacher", missing=hint)]
    agreement = agreement_section(caches, evaluations)
    if not agreement.text:
        agreement.missing = "no teacher cache and no evaluation with a teacher (`evaluate --rerank-teacher`)"
    sections += [agreement, training_section(students + found.get("train-teacher", []), root),
                 evaluations_section(evaluations)]
    return sections
