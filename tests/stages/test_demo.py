"""The demo end to end in --quick mode, with the committed demo models."""
import json
from pathlib import Path

import pytest

from conftest import cli

ASSETS = Path(__file__).resolve().parents[2] / "data" / "demo"


@pytest.mark.skipif(not (ASSETS / "student.safetensors").exists(), reason="demo assets not built")
def test_quick_demo_runs_every_path_and_reports_every_row(tmp_path):
    out = tmp_path / "demo"
    r = cli("demo", "--quick", "--out", out, "--device", "cpu")
    report = (out / "report.md").read_text()
    for row in ("student (before distillation)", "teacher re-rank, ITM + ITC", "teacher re-rank, ITM only",
                "loss=none", "loss=kl", "loss=cprd", "loss=cprd, ITM-only teacher"):
        assert f"| {row}" in report, row
    data = json.loads((out / "report.json").read_text())
    assert len(data["loss=cprd"]) == 2  # two seeds
    assert data["teacher re-rank, ITM + ITC (top 16)"][0]["rsum"] > data["student (before distillation)"][0]["rsum"]
    assert (out / "report.png").stat().st_size > 10_000
    # a second run re-uses every stage
    again = cli("demo", "--quick", "--out", out, "--device", "cpu").output
    assert again.count("up to date") >= 3 + 8
