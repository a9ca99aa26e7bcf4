"""The run report: a full run has every section with figures that decode and numbers that match a naive
recomputation; a partial run names what is missing; the HTML is well formed and self-contained."""
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import cli, parse_report_html as parse, write_albef_corpus
from pipeline import report as rep

SECTIONS = ("scores", "positives", "agreement", "training", "evaluations")
@pytest.fixture(scope="module")
def full_run(tmp_path_factory, scored_run, tiny_clip, tiny_blip):
    """mine + teacher + a 3-step distill + evaluations of the distilled student (with the teacher) and of the
    starting student."""
    root = tmp_path_factory.mktemp("report")
    shutil.copytree(scored_run, root / "run")
    run = root / "run"
    cli("distill", "--run", run, "--max-steps", "3", "--batch-size", "16", "--num-negatives", "4", "--device", "cpu")
    test = write_albef_corpus(root / "test", n_images=12, seed=1)
    cli("evaluate", "--run", run, "--data", test, "--rerank-teacher", tiny_blip, "--k-test", "4", "--device", "cpu")
    cli("evaluate", "--model", tiny_clip, "--data", test, "--out", run / "eval-student", "--device", "cpu")
    return run


def table(md: str, header_start: str) -> list[list[str]]:
    """The rows of the Markdown table whose header starts with header_start."""
    lines = md.splitlines()
    i = next(i for i, l in enumerate(lines) if l.startswith(header_start))
    rows = []
    for l in lines[i + 2:]:
        if not l.startswith("|"):
            break
        rows.append([c.strip() for c in l.strip().strip("|").split("|")])
    return rows


def naive_teacher_numbers(run):
    """Per direction: share of (negative, positive) pairs the teacher orders wrongly (mean over queries) and the
    mean Kendall tau-b between student and teacher scores, by explicit loops over the shards."""
    out = {}
    rows = [r for f in sorted((run / "teacher").glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    for d in ("i2t", "t2i"):
        above, taus = [], []
        for r in (r for r in rows if r["direction"] == d):
            t, s, p = r["teacher_scores"], r["student_scores"], r["positive_teacher_scores"]
            above.append(np.mean([tn > tp for tn in t for tp in p]))
            conc = n_s = n_t = 0
            for i in range(len(t)):
                for j in range(i + 1, len(t)):
                    a, b = np.sign(s[i] - s[j]), np.sign(t[i] - t[j])
                    conc += a * b
                    n_s += a != 0
                    n_t += b != 0
            if n_s and n_t:
                taus.append(conc / np.sqrt(n_s * n_t))
        out[d] = (100 * np.mean(above), np.mean(taus))
    return out


def test_full_run_has_every_section_and_the_numbers_match_a_naive_count(full_run):
    result = cli("report", "--run", full_run)
    out = full_run / "report"
    assert str(out / "index.html") in result.output
    checker = parse(out / "index.html")
    assert checker.sections == list(SECTIONS) and not checker.missing
    assert len(checker.images) == 5
    md = (out / "report.md").read_text()
    for name in (l.split("(")[1].rstrip(")") for l in md.splitlines() if l.startswith("![")):
        with Image.open(out / name) as im:
            im.load()

    want = naive_teacher_numbers(full_run)
    positives = {r[0]: float(r[4].rstrip("%")) for r in table(md, "| direction | queries |")}
    agreement = {r[0]: float(r[1]) for r in table(md, "| direction | mean Kendall tau |")}
    for d in ("i2t", "t2i"):
        assert positives[d] == pytest.approx(want[d][0], abs=0.051)   # printed with one decimal
        assert agreement[d] == pytest.approx(want[d][1], abs=0.0006)

    # every evaluation, the re-rank too, with the change against the starting student's evaluation
    evals = {r[0]: r for r in table(md, "| evaluation | model | i2t R@1")}
    distilled = json.loads((full_run / "eval" / "metrics.json").read_text())
    start = json.loads((full_run / "eval-student" / "metrics.json").read_text())
    assert float(evals["eval"][8]) == pytest.approx(distilled["rsum"], abs=0.051)
    assert float(evals["eval"][9]) == pytest.approx(distilled["rsum"] - start["rsum"], abs=0.051)
    assert float(evals["eval + teacher re-rank"][9]) == pytest.approx(
        distilled["rerank"]["rsum"] - start["rsum"], abs=0.051)
    assert evals["eval-student"][9] == "(the starting student)"

    # training: every named term of metrics.jsonl is plotted and the last loss is in the table
    steps = [json.loads(l) for l in (full_run / "distill" / "metrics.jsonl").read_text().splitlines()]
    (student,) = table(md, "| student | state |")
    assert student[:3] == ["distill", "complete", "3"]
    assert float(student[3]) == pytest.approx(steps[-1]["loss"], abs=1e-4)
    assert "in_batch_share" in steps[-1] and "`in_batch_share`" in md and "`images_encoded`" in md


def test_partial_run_names_what_is_missing(mined_run, tmp_path):
    shutil.copytree(mined_run, tmp_path / "run")
    cli("report", "--run", tmp_path / "run", "--out", tmp_path / "r")
    checker = parse(tmp_path / "r" / "index.html")
    assert checker.sections == list(SECTIONS) and not checker.images
    text = " ".join(checker.missing)
    for hint in ("cprd-pipeline score-teacher", "cprd-pipeline distill", "cprd-pipeline evaluate"):
        assert hint in text, hint
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.count("_Not in this run:") == len(SECTIONS)


def test_torn_metrics_line_is_left_out_and_an_unfinished_student_is_marked(full_run, tmp_path):
    shutil.copytree(full_run / "distill", tmp_path / "run" / "distill")
    (tmp_path / "run" / "distill" / "_SUCCESS").unlink()
    with open(tmp_path / "run" / "distill" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    sections = {s.key: s for s in rep.build(tmp_path / "run")}
    (student,) = table(sections["training"].text, "| student | state |")
    assert student[:3] == ["distill", "in progress", "3"]


def test_missing_run_directory_is_an_error(tmp_path):
    result = cli("report", "--run", tmp_path / "nope", expect=2)
    assert "no such run directory" in result.output and not (tmp_path / "nope").exists()
