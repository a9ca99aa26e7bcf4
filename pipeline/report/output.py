"""The report's files: report.md (the figures as fig-NN.png beside it) and index.html, each written atomically."""
from __future__ import annotations

from pathlib import Path

from ..artifacts import atomic_write_bytes
from .html import render_html
from .sections import Section


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
