"""The report as one self-contained HTML page: each section's Markdown rendered by the `markdown` library (pipe
tables, fenced and indented code, `code`, **bold**, a line break kept as one), figures embedded as base64 PNG.

Text is text: HTML written in a section (a model name such as `<org>/<model>`, a path) is escaped, never passed
through, and a table is wrapped in a box that scrolls it sideways, so nothing widens the page.
"""
from __future__ import annotations

import base64
import html
import xml.etree.ElementTree as etree
from typing import TYPE_CHECKING

import markdown
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor

if TYPE_CHECKING:
    from .sections import Section

# Nothing may widen the page: tables scroll in their box (cells stay on one line, so rows read across), images
# shrink to the column, and long paths in text break.
STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
         ".table-scroll{max-width:100%;overflow-x:auto;margin:1em 0}"
         "table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;"
         "text-align:right;white-space:nowrap}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
         "figure{margin:1em 0}img{max-width:100%;height:auto;border:1px solid #eee}"
         "p,figcaption,nav{overflow-wrap:anywhere}.missing{color:#a33}nav a{margin-right:1em}code{font-size:90%}"
         "pre{overflow-x:auto;background:#f7f7f7;padding:.5em}")


class _SectionTree(Treeprocessor):
    """Each <table> inside <div class="table-scroll">; a heading one level down (the section's title is <h2>), at
    most <h4>."""

    def run(self, root: etree.Element) -> None:
        for el in root.iter():
            if el.tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
                el.tag = f"h{min(int(el.tag[1]) + 1, 4)}"
        for parent in list(root.iter()):
            for i, child in enumerate(list(parent)):
                if child.tag == "table":
                    box = etree.Element("div", {"class": "table-scroll"})
                    parent.remove(child)
                    box.append(child)
                    parent.insert(i, box)


class _ReportMarkdown(Extension):
    """Raw HTML and entities are text (escaped); tables scroll in their box; headings sit under the section's."""

    def extendMarkdown(self, md: markdown.Markdown) -> None:
        md.preprocessors.deregister("html_block")
        md.inlinePatterns.deregister("html")
        md.inlinePatterns.deregister("entity")
        md.treeprocessors.register(_SectionTree(md), "section_tree", 0)


def markdown_to_html(text: str) -> str:
    """A section's Markdown as an HTML fragment."""
    return markdown.markdown(text, extensions=["tables", "fenced_code", "nl2br", _ReportMarkdown()])


def render_html(sections: list["Section"], title: str) -> str:
    nav = "".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in sections)
    body = []
    for s in sections:
        body.append(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>')
        if s.missing:
            body.append(f'<p class="missing">Not in this run: {html.escape(s.missing)}.</p>')
        else:
            body.append(markdown_to_html(s.text))
            for caption, png in s.figures:
                data = base64.b64encode(png).decode()
                body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        body.append("</section>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><nav>{nav}</nav>\n"
            + "\n".join(body) + "\n</body></html>\n")
