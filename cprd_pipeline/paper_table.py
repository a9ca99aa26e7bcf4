"""The paper's table (docs/paper.md) from demo runs of data/paper.yaml: per finding, each comparison's RSUM
difference with its standard error over the galleries, its size in pooled standard deviations over seeds, and a
verdict.

    python -m cprd_pipeline.paper_table runs/paper-c0/report-test*.json runs/paper-c1/report-test*.json \
        --choose kl-itm=kl-itm-t4 --choose kl-prob=kl-prob-t0.2

A demo run's report.json (copy it per split: each demo run writes its own) maps each row's label to one metrics dict per seed, each with `rsum_per_gallery`. For
rows A and B on G galleries: the per-gallery difference d_g = mean over seeds of A's RSUM on gallery g minus
B's; the difference is mean_g d_g, its standard error sd_g(d) / sqrt(G) (the draw of test images, the larger
uncertainty on this corpus); the pooled sd is sqrt((sd_A^2 + sd_B^2) / 2) of the seeds' RSUM (each averaged
over the galleries). The verdict: A above B when the difference is at least 2 standard errors, below when at
most -2, else inconclusive.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# (finding, A's method name, B's method name, what A above B would say)
COMPARISONS = [
    ("1", "kl-prob", "kl-itm", "KL on probabilities against KL on log-odds"),
    ("1", "cprd-itm", "kl-itm", "CPRD against KL, both on log-odds"),
    ("1", "cprd-prob", "kl-prob", "CPRD against KL, both on probabilities (the paper's condition)"),
    ("2", "cprd", "cprd-easy", "CPRD over hard lists against CPRD over easy (random) lists"),
    ("2", "cprd-easy", "none", "CPRD over easy lists against no distillation"),
    ("3", "cprd-nv8", "partial-ranknet", "CPRD against RankNet over the same pairs"),
    ("3", "cprd-nv8", "partial-hinge", "CPRD against a hinge over the same pairs"),
    ("3", "cprd-nv8", "cprd", "CPRD (8 valid) against ListMLE (CPRD with all 32 valid)"),
    *[("LoopITR", f"kl-pos-n{n}", "kl-pos-n32", f"KL + positive over the first {n} mined negatives against all 32")
      for n in (1, 2, 4, 8)],
]


@dataclass
class Difference:
    mean: float          # mean over galleries of the per-gallery difference
    se: float            # its standard error over the galleries
    pooled_sd: float     # over seeds
    galleries: int

    @property
    def verdict(self) -> str:
        if self.se > 0 and self.mean >= 2 * self.se:
            return "above"
        if self.se > 0 and self.mean <= -2 * self.se:
            return "below"
        return "inconclusive"


def _sd(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def difference(a: list[dict], b: list[dict]) -> Difference:
    """A minus B from their per-seed metrics (each with rsum_per_gallery over the same galleries)."""
    per_a = [s["rsum_per_gallery"] for s in a]
    per_b = [s["rsum_per_gallery"] for s in b]
    g = len(per_a[0])
    if any(len(p) != g for p in per_a + per_b):
        raise ValueError("the rows were evaluated on different numbers of galleries")
    d = [sum(p[i] for p in per_a) / len(per_a) - sum(p[i] for p in per_b) / len(per_b) for i in range(g)]
    mean = sum(d) / g
    se = _sd(d) / math.sqrt(g) if g > 1 else 0.0
    seeds = lambda per: [sum(p) / len(p) for p in per]
    pooled = math.sqrt((_sd(seeds(per_a)) ** 2 + _sd(seeds(per_b)) ** 2) / 2)
    return Difference(mean, se, pooled, g)


def rows_by_name(report_file: Path, recipe_methods: dict[str, str]) -> dict[str, list[dict]]:
    """A report.json's rows by method name (the recipe maps names to labels)."""
    report = json.loads(report_file.read_text())
    return {name: report[label] for name, label in recipe_methods.items() if label in report}


def table(runs: dict[str, dict[str, list[dict]]], comparisons=COMPARISONS,
          chosen: Optional[dict[str, str]] = None) -> str:
    """Markdown: a row per comparison, a column per corpus (difference ± SE, pooled sd, verdict)."""
    chosen = chosen or {}
    head = "| finding | comparison (A vs B) | " + " | ".join(runs) + " |\n| --- | --- |" + " --- |" * len(runs) + "\n"
    body = []
    for finding, a, b, what in comparisons:
        a, b = chosen.get(a, a), chosen.get(b, b)
        cells = []
        for rows in runs.values():
            if a not in rows or b not in rows:
                cells.append("not run")
                continue
            d = difference(rows[a], rows[b])
            cells.append(f"{d.mean:+.1f} ± {d.se:.1f} ({d.mean / d.pooled_sd:+.1f} sd): {d.verdict}"
                         if d.pooled_sd else f"{d.mean:+.1f} ± {d.se:.1f}: {d.verdict}")
        body.append(f"| {finding} | {what} (`{a}` vs `{b}`) | " + " | ".join(cells) + " |")
    return head + "\n".join(body) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    from .demo_recipe import Recipe

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path, help="report.json files of data/paper.yaml's demo runs (a "
                                                          "column per folder, e.g. one per corpus, its files' "
                                                          "rows together)")
    ap.add_argument("--recipe", default="data/paper.yaml")
    ap.add_argument("--choose", action="append", default=[],
                    help="GENERIC=METHOD: the row a comparison's generic name stands for (kl-itm=kl-itm-t4)")
    args = ap.parse_args(argv)
    labels = {m.name: m.label for m in Recipe.load(args.recipe).methods}
    runs: dict[str, dict[str, list[dict]]] = {}
    for r in args.reports:   # one column per folder: its report files' rows together
        runs.setdefault(r.parent.name, {}).update(rows_by_name(r, labels))
    print(table(runs, chosen=dict(c.split("=", 1) for c in args.choose)), end="")


if __name__ == "__main__":
    main()
