"""The run report: pictures and tables of whatever a run directory holds, as one HTML file and a Markdown file.

    sections = build(root)                 # finds the stage outputs under root by their manifests
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

One module per job:
  discover   the stage outputs under a root, found by their manifests (never by folder names)
  read       what those outputs hold: teacher shards (Parquet, sampled), evaluations
  figures    the matplotlib figures
  sections   the sections, as Markdown text and figures, and `build`
  html       Markdown to HTML (the `markdown` library) and the self-contained page
  output     report.md, the figures as files, and `write`
"""
from .discover import Found, discover
from .figures import LEGEND_SIZE, rsum_figure, training_figure
from .html import STYLE, markdown_to_html, render_html
from .output import render_markdown, write
from .read import MAX_QUERIES, Cache, Direction, Evaluation, read_caches, read_evaluations, read_teacher
from .sections import (Section, agreement_section, build, evaluations_section, positives_section, scores_section,
                       training_section)

__all__ = ["Found", "discover", "LEGEND_SIZE", "rsum_figure", "training_figure", "STYLE", "markdown_to_html",
           "render_html", "render_markdown", "write", "MAX_QUERIES", "Cache", "Direction", "Evaluation",
           "read_caches", "read_evaluations", "read_teacher", "Section", "agreement_section", "build",
           "evaluations_section", "positives_section", "scores_section", "training_section"]
