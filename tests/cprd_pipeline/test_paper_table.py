"""The paper's table: differences, standard errors and pooled sds against numpy, verdicts at 2 standard errors,
rows not run named as such, and the shipped recipe's method names in every comparison."""
import numpy as np
import pytest

from cprd_pipeline import paper_table as pt
from cprd_pipeline.demo_recipe import Recipe
from conftest import REPO


def seeds(rng, n_seeds, galleries, shift):
    return [{"rsum_per_gallery": list(rng.normal(300 + shift, 5, galleries))} for _ in range(n_seeds)]


def test_difference_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = seeds(rng, 3, 12, 4.0), seeds(rng, 2, 12, 0.0)
    A = np.array([s["rsum_per_gallery"] for s in a])
    B = np.array([s["rsum_per_gallery"] for s in b])
    d = A.mean(0) - B.mean(0)
    got = pt.difference(a, b)
    assert got.mean == pytest.approx(d.mean()) and got.galleries == 12
    assert got.se == pytest.approx(d.std(ddof=1) / np.sqrt(12))
    assert got.pooled_sd == pytest.approx(np.sqrt((A.mean(1).std(ddof=1) ** 2 + B.mean(1).std(ddof=1) ** 2) / 2))


@pytest.mark.parametrize("shift,verdict", [(10.0, "above"), (-10.0, "below"), (0.0, "inconclusive")])
def test_the_verdict_is_two_standard_errors(shift, verdict):
    base = [300.0, 310.0, 305.0, 295.0]
    a = [{"rsum_per_gallery": [x + shift + e for x, e in zip(base, (1, -1, 2, -2))]}]
    b = [{"rsum_per_gallery": base}]
    assert pt.difference(a, b).verdict == verdict


def test_galleries_must_agree_and_missing_rows_are_named():
    with pytest.raises(ValueError, match="galleries"):
        pt.difference([{"rsum_per_gallery": [1.0, 2.0]}], [{"rsum_per_gallery": [1.0]}])
    rows = {"cprd": [{"rsum_per_gallery": [300.0, 301.0]}] * 2, "cprd-easy": [{"rsum_per_gallery": [299.0, 297.0]}] * 2}
    text = pt.table({"c0": rows}, comparisons=[("2", "cprd", "cprd-easy", "hard vs easy"), ("3", "x", "y", "z")])
    lines = text.splitlines()
    assert lines[2].startswith("| 2 | hard vs easy (`cprd` vs `cprd-easy`) | +2.5 ± 1.5")
    assert lines[3].endswith("| not run |")


def test_every_comparison_names_methods_of_the_paper_recipe():
    names = {m.name for m in Recipe.load(REPO / "data" / "paper.yaml").methods}
    generic = {"kl-itm": "kl-itm-t4", "kl-prob": "kl-prob-t0.2"}
    for _, a, b, _ in pt.COMPARISONS:
        assert generic.get(a, a) in names and generic.get(b, b) in names, (a, b)
