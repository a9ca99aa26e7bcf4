"""The run report: pictures and tables of whatever a run directory holds, as one HTML file and a Markdown file.

    sections = build(root)                 # finds the stage directories under root by their manifests
    write(sections, root / "report")       # index.html (images embedded), report.md + fig-*.png

Sections, each present when its stage output is (and otherwise named, with what to run):
  scores       teacher and student scores over the mined hard negatives, per direction and teacher cache (every
               round of a loop; the CPRD paper's first finding: the cross-encoder's scores are concentrated, the
               dual encoder's near-normal)
  positives    teacher scores of positives vs hard negatives, and the share of negatives above the positive
  agreement    per-query Kendall tau between the student's and the teacher's order at mining time, and the
               mean agreement of every evaluated student
  training     every named term of every distilled student's metrics.jsonl, learning rate, logit scale and,
               with validation during training, its RSUM
  evaluations  every evaluation's recall in one table, with the change against the starting student

Large runs are sampled (at most MAX_QUERIES queries per direction of a cache) for the distributions; the section
says so. The HTML never widens the page: a wide table scrolls inside its own box.
"""
from __future__ import annotations

import base64
import html
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .artifacts import MANIFEST, SUCCESS, atomic_write_bytes, read_json, read_jsonl
from .metrics import KS, kendall_tau

MAX_QUERIES = 20000


@dataclass
class Section:
    key: str
    title: str
    text: str = ""                                   # Markdown: paragraphs and tables
    figures: list[tuple[str, bytes]] = field(default_factory=list)   # (caption, PNG bytes)
    missing: Optional[str] = None                    # why the section is empty, and what to run


@dataclass
class Found:
    """A stage directory under the report's root, with its manifest."""
    path: Path
    manifest: dict
    complete: bool

    def label(self, root: Path) -> str:
        rel = os.path.relpath(self.path, root)
        return rel if rel != "." else self.path.name


def _natural(name: str) -> list:
    """Sort key that orders round-2 before round-10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def discover(root: Path, max_depth: int = 4) -> dict[str, list[Found]]:
    """Stage directories under root, by manifest stage (mine, teacher, distill, evaluate), in path order.

    A folder whose manifest names a stage is that stage's output, and its subfolders (checkpoints, corpus,
    embeddings, ...) are its own, so the walk does not enter it; every other folder is walked, to max_depth. A
    link to a folder under root (a round that re-uses another run's output, as the demo's loops do) is not
    followed: the output is reported once, where it lives."""
    found: dict[str, list[Found]] = {}
    inside = Path(root).resolve()

    def elsewhere_under_root(e: os.DirEntry) -> bool:
        return e.is_symlink() and Path(e.path).resolve().is_relative_to(inside)

    def walk(d: Path, depth: int) -> None:
        m = read_json(d / MANIFEST) if (d / MANIFEST).is_file() else None
        if m is not None and "stage" in m:
            found.setdefault(m["stage"], []).append(Found(d, m, (d / SUCCESS).exists()))
            return
        if depth == max_depth:
            return
        with os.scandir(d) as entries:   # DirEntry.is_dir needs no stat per file (large image folders)
            subs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")
                    and not elsewhere_under_root(e)]
        for name in sorted(subs, key=_natural):
            walk(d / name, depth + 1)

    walk(Path(root), 0)
    return found


# ---------------------------------------------------------------------------------------------- figures
LEGEND_SIZE = 9       # points: read at the page's width, where a figure is shown at about 85% of its size


def _png(fig, title: Optional[str] = None) -> bytes:
    """The figure as PNG; `title` (the output a figure draws, e.g. `round-2/teacher`) goes above its panels."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    if title:
        fig.suptitle(title, fontsize=12, fontweight="bold")
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=96)
    plt.close(fig)
    return buf.getvalue()


def _figure(rows: int, cols: int, width: float = 5.0, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, axes


def _moments(x: np.ndarray) -> dict[str, float]:
    """Mean, std, skewness and excess kurtosis (0 for a normal distribution)."""
    mu, sd = float(x.mean()), float(x.std())
    z = (x - mu) / (sd if sd > 0 else 1.0)
    return {"mean": mu, "std": sd, "skew": float((z ** 3).mean()), "kurtosis": float((z ** 4).mean() - 3)}


# ---------------------------------------------------------------------------------------------- teacher data
@dataclass
class Direction:
    """One direction's rows of a teacher cache (sampled): [Q, k] candidate scores, and each query's positives."""
    student: np.ndarray
    teacher: np.ndarray
    positives: list[np.ndarray]
    total: int                      # queries before sampling


def read_teacher(teacher_dir: Path, manifest: dict, max_queries: int = MAX_QUERIES, seed: int = 0) -> dict[str, Direction]:
    import pyarrow.parquet as pq

    from .layout import teacher_shards

    import pyarrow as pa
    import pyarrow.compute as pc

    cols = ["direction", "student_scores", "teacher_scores", "positive_teacher_scores"]
    table = pa.concat_tables([pq.read_table(teacher_dir / f, columns=cols) for f in teacher_shards(manifest)])
    out = {}
    for d in ("i2t", "t2i"):
        sub = table.filter(pc.equal(table["direction"], d))
        if sub.num_rows == 0:
            continue
        lengths = pc.list_value_length(sub["student_scores"]).to_numpy(zero_copy_only=False)
        full = np.flatnonzero(lengths == lengths.max())   # rows with fewer candidates (tiny corpora) are left out
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(full, size=min(max_queries, len(full)), replace=False))
        rows = sub.take(pa.array(pick))                    # only the sampled rows become Python lists
        out[d] = Direction(np.array(rows["student_scores"].to_pylist(), np.float32),
                           np.array(rows["teacher_scores"].to_pylist(), np.float32),
                           [np.asarray(r, np.float32) for r in rows["positive_teacher_scores"].to_pylist()],
                           total=sub.num_rows)
    return out


@dataclass
class Cache:
    """A complete teacher cache, read: its label under the root, the teacher's score, its rows per direction."""
    label: str
    score: str
    dirs: dict[str, Direction]


def read_caches(teachers: list[Found], root: Path, max_queries: int = MAX_QUERIES) -> list[Cache]:
    caches = [Cache(t.label(root), t.manifest["config"].get("score", "teacher"),
                    read_teacher(t.path, t.manifest, max_queries)) for t in teachers]
    return [c for c in caches if c.dirs]


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


# ---------------------------------------------------------------------------------------------- training
TRAINING_SKIP = {"step", "epoch", "false_negatives", "dropped_by_margin", "negatives", "negatives_in_batch"}


LINE_STYLES = ("-", "--", ":", "-.")
INSIDE_LEGEND = 6     # students a legend may list inside its panel before it hides the curves


def training_figure(runs: list[tuple[str, list[dict]]], keys: list[str]):
    """One panel per key over the steps, each with its own legend; a student keeps its colour and line style in
    every panel (also in those where another student has no curve)."""
    from matplotlib.ticker import MaxNLocator

    cols = min(2, len(keys))
    outside = len(runs) > INSIDE_LEGEND
    fig, axes = _figure((len(keys) + cols - 1) // cols, cols, width=6.0,
                        height=3.4 + (0.25 * ((len(runs) + 1) // 2) if outside else 0))
    styles = {label: {"color": f"C{i % 10}", "linestyle": LINE_STYLES[i // 10 % len(LINE_STYLES)]}
              for i, (label, _) in enumerate(runs)}
    for i, key in enumerate(keys):
        ax = axes[i // cols][i % cols]
        for label, rows in runs:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=label, **styles[label])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if outside:   # under the panel, not over its curves
            ax.legend(fontsize=LEGEND_SIZE, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
        else:
            ax.legend(fontsize=LEGEND_SIZE)
    for j in range(len(keys), axes.size):
        axes[j // cols][j % cols].axis("off")
    return fig


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


# ---------------------------------------------------------------------------------------------- evaluations
@dataclass
class Evaluation:
    label: str
    model: str
    metrics: dict
    corpus: str
    starting: bool      # the evaluated model is the student that mined the run


def _found_at(manifest: dict, key: str) -> str | None:
    """Where a stage found its model `key`: the manifest's locations, or the path earlier versions kept in the
    identity; None for a hub model."""
    identity = manifest.get("identity", {}).get(key) or {}
    if "hub" in identity:
        return None
    return (manifest.get("locations") or {}).get(key) or identity.get("path")


def read_evaluations(found: list[Found], mines: list[Found], students: list[Found], root: Path) -> list[Evaluation]:
    """Finished evaluations. The starting student is a mine's student that no distill under root made (in a
    loop, round r mines with round r-1's distilled student)."""
    distilled = {str((s.path / "final").resolve()) for s in students}
    starting = [m.manifest["identity"].get("student") for m in mines
                if _found_at(m.manifest, "student") not in distilled]
    out = []
    for e in found:
        metrics = read_json(e.path / "metrics.json") if e.complete else None
        if metrics is None:
            continue
        ident = e.manifest.get("identity", {})
        model = ident.get("model") or {}
        where = _found_at(e.manifest, "model")
        name = where or model.get("hub") or metrics.get("model", "?")
        rel = os.path.relpath(name, root) if where else name
        out.append(Evaluation(e.label(root), rel if not rel.startswith("../..") else name, metrics,
                              ident.get("corpus", ""), model in starting))
    return out


def rsum_figure(bars: list[tuple[str, float]]):
    """RSUM per evaluation as bars from zero (so a bar's length is its RSUM), each labelled with its value."""
    fig, axes = _figure(1, 1, width=8, height=0.32 * len(bars) + 1.2)
    ax = axes[0][0]
    drawn = ax.barh(range(len(bars)), [v for _, v in bars], color="tab:blue")
    ax.bar_label(drawn, fmt="%.1f", padding=3, fontsize=LEGEND_SIZE)
    ax.set_yticks(range(len(bars)), [n for n, _ in bars], fontsize=LEGEND_SIZE)
    ax.set_xlim(0, 1.12 * max(max(v for _, v in bars), 1.0))   # room for the value labels
    ax.invert_yaxis()
    ax.set_title("RSUM per evaluation (higher is better)")
    return fig


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


# ---------------------------------------------------------------------------------------------- assembly
def build(root: Path, extra: Optional[list[Section]] = None, max_queries: int = MAX_QUERIES) -> list[Section]:
    """Every section, in order; `extra` (e.g. the demo's comparison table) goes first."""
    root = Path(root)
    found = discover(root)
    mines = [f for f in found.get("mine", []) if f.complete]
    students = found.get("distill", [])
    evaluations = read_evaluations(found.get("evaluate", []), mines, students, root)
    sections = list(extra or [])
    caches = read_caches([f for f in found.get("teacher", []) if f.complete], root, max_queries)
    unfinished = [f.label(root) for f in found.get("teacher", []) if not f.complete]
    if caches:
        sections += [scores_section(caches), positives_section(caches)]
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


def render_markdown(sections: list[Section], title: str, figure_names: list[list[str]]) -> str:
    out = [f"# {title}\n"]
    for s, names in zip(sections, figure_names):
        out.append(f"## {s.title}\n")
        if s.missing:
            out.append(f"_Not in this run: {s.missing}._\n")
            continue
        out.append(s.text.rstrip() + "\n")
        out += [f"![{cap}]({name})\n" for (cap, _), name in zip(s.figures, names)]
    return "\n".join(out)


def _md_to_html(text: str) -> str:
    """The Markdown this module writes (paragraphs, pipe tables, `code`, **bold**) as HTML."""
    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
        return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)

    blocks, out = text.strip().split("\n\n"), []
    for b in blocks:
        lines = [l for l in b.splitlines() if l.strip()]
        if lines and all(l.startswith("|") for l in lines):
            rows = [[c.strip() for c in l.strip().strip("|").split("|")] for l in lines]
            body = [r for r in rows[1:] if not all(set(c) <= {"-", " "} for c in r)]
            # a wide table scrolls inside its own box; the page keeps its width
            out.append('<div class="table-scroll"><table><thead><tr>'
                       + "".join(f"<th>{inline(c)}</th>" for c in rows[0]) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</tbody></table></div>")
        elif lines and lines[0].startswith("#"):
            level = min(len(lines[0]) - len(lines[0].lstrip("#")) + 1, 4)
            out.append(f"<h{level}>{inline(lines[0].lstrip('#').strip())}</h{level}>")
            if lines[1:]:
                out.append(f"<p>{inline(' '.join(lines[1:]))}</p>")
        elif lines:
            out.append("<p>" + "<br>".join(inline(l) for l in lines) + "</p>")
    return "\n".join(out)


# Nothing may widen the page: tables scroll in their box (cells stay on one line, so rows read across), images
# shrink to the column, and long paths in text break.
STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
         ".table-scroll{max-width:100%;overflow-x:auto;margin:1em 0}"
         "table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;"
         "text-align:right;white-space:nowrap}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
         "figure{margin:1em 0}img{max-width:100%;height:auto;border:1px solid #eee}"
         "p,figcaption,nav{overflow-wrap:anywhere}.missing{color:#a33}nav a{margin-right:1em}code{font-size:90%}")


def render_html(sections: list[Section], title: str) -> str:
    nav = "".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in sections)
    body = []
    for s in sections:
        body.append(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>')
        if s.missing:
            body.append(f'<p class="missing">Not in this run: {html.escape(s.missing)}.</p>')
        else:
            body.append(_md_to_html(s.text))
            for caption, png in s.figures:
                data = base64.b64encode(png).decode()
                body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        body.append("</section>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><nav>{nav}</nav>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write(sections: list[Section], out: Path, title: str) -> Path:
    """index.html, report.md and the figures as fig-NN.png, each replaced atomically; returns index.html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("fig-*.png"):   # figures of an earlier report of this folder
        old.unlink()
    names, n = [], 0
    for s in sections:
        names.append([])
        for _, png in s.figures:
            n += 1
            names[-1].append(f"fig-{n:02d}.png")
            atomic_write_bytes(out / names[-1][-1], png)
    atomic_write_bytes(out / "report.md", render_markdown(sections, title, names).encode())
    atomic_write_bytes(out / "index.html", render_html(sections, title).encode())
    return out / "index.html"
