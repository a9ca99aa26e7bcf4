"""The run report: a full run has every section with figures that decode and numbers that match a naive
recomputation; every round of a loop is drawn; a partial run names what is missing; the HTML is well formed,
self-contained, and its tables scroll in their own box; the figures read at a glance."""
import json
import shutil
from html.parser import HTMLParser

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
    positives = {r[1]: float(r[5].rstrip("%")) for r in table(md, "| teacher cache | direction | queries |")}
    agreement = {r[1]: float(r[3]) for r in table(md, "| teacher cache | direction | candidates |")}
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


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory, full_run):
    """A loop's layout (RUN/round-N/{mine,teacher,distill,eval}) from copies of the full run's stages, with a
    round 10 to check the order."""
    root = tmp_path_factory.mktemp("loop")
    for r in (1, 2, 10):
        for stage in ("mine", "teacher", "distill", "eval"):
            shutil.copytree(full_run / stage, root / f"round-{r}" / stage, symlinks=True)
    return root


def test_every_round_of_a_loop_is_drawn_in_round_order(loop_run):
    sections = {s.key: s for s in rep.build(loop_run)}
    rounds = ["round-1/teacher", "round-2/teacher", "round-10/teacher"]
    for key, header in (("scores", "| teacher cache | direction | model |"),
                        ("positives", "| teacher cache | direction | queries |"),
                        ("agreement", "| teacher cache | direction | candidates |")):
        s = sections[key]
        assert [caption.split(":")[0] for caption, _ in s.figures] == rounds, key
        assert list(dict.fromkeys(r[0] for r in table(s.text, header))) == rounds, key
        assert "not plotted" not in s.text
    (training,) = sections["training"].figures
    assert [r[0] for r in table(sections["training"].text, "| student | state |")] == \
           ["round-1/distill", "round-2/distill", "round-10/distill"]


def test_stage_outputs_are_found_by_their_manifests_and_not_searched_inside(full_run, tmp_path):
    # any folder name may hold a stage's output ("models" and "data" included); a stage folder's own
    # subfolders are its contents, not more outputs
    shutil.copytree(full_run / "eval", tmp_path / "run" / "models" / "eval")
    shutil.copytree(full_run / "teacher", tmp_path / "run" / "data" / "teacher")
    shutil.copytree(full_run / "eval", tmp_path / "run" / "data" / "teacher" / "inside" / "eval")
    found = rep.discover(tmp_path / "run")
    assert {k: [f.label(tmp_path / "run") for f in v] for k, v in found.items()} == \
           {"evaluate": ["models/eval"], "teacher": ["data/teacher"]}


def test_a_link_to_an_output_under_the_root_is_reported_once_where_it_lives(full_run, tmp_path):
    # a loop round that re-uses another run's teacher cache links it; one outside the root is followed
    shutil.copytree(full_run / "teacher", tmp_path / "run" / "a" / "teacher")
    shutil.copytree(full_run / "eval", tmp_path / "outside" / "eval")
    (tmp_path / "run" / "loop" / "round-1").mkdir(parents=True)
    (tmp_path / "run" / "loop" / "round-1" / "teacher").symlink_to("../../a/teacher", target_is_directory=True)
    (tmp_path / "run" / "linked-eval").symlink_to(tmp_path / "outside" / "eval", target_is_directory=True)
    found = rep.discover(tmp_path / "run")
    assert {k: [f.label(tmp_path / "run") for f in v] for k, v in found.items()} == \
           {"teacher": ["a/teacher"], "evaluate": ["linked-eval"]}


class Tables(HTMLParser):
    """Each <table>'s enclosing element, as (tag, class)."""

    def __init__(self):
        super().__init__()
        self.stack, self.parents = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.parents.append(self.stack[-1])
        if tag not in ("meta", "img", "br"):
            self.stack.append((tag, dict(attrs).get("class")))

    def handle_endtag(self, tag):
        self.stack.pop()


def test_wide_tables_scroll_in_their_own_box(full_run, tmp_path):
    index = rep.write(rep.build(full_run), tmp_path / "r", "t")
    tables = Tables()
    tables.feed(index.read_text())
    assert len(tables.parents) >= 5 and set(tables.parents) == {("div", "table-scroll")}
    style = rep.STYLE.replace(" ", "")
    rule = style.split(".table-scroll{")[1].split("}")[0]
    assert "overflow-x:auto" in rule.split(";")


def test_rsum_bars_start_at_zero_and_show_their_values():
    fig = rep.rsum_figure([("a", 250.0), ("b", 262.5)])
    (ax,) = fig.axes
    assert ax.get_xlim()[0] == 0 and ax.get_xlim()[1] > 262.5
    assert [t.get_text() for t in ax.texts] == ["250.0", "262.5"]


@pytest.mark.parametrize("students", [2, 12])
def test_every_training_panel_has_its_own_legend_and_a_student_keeps_its_line(students):
    runs = [(f"s{i}", [{"step": t, "loss": 1.0 / t, **({"val_rsum": 200.0 + t} if i % 2 else {})} for t in (1, 2, 3)])
            for i in range(students)]
    fig = rep.training_figure(runs, ["loss", "val_rsum"])
    loss, val = fig.axes[:2]
    for ax, want in ((loss, [f"s{i}" for i in range(students)]), (val, [f"s{i}" for i in range(1, students, 2)])):
        legend = ax.get_legend()
        assert [t.get_text() for t in legend.get_texts()] == want
        assert all(t.get_fontsize() >= 9 for t in legend.get_texts())
    line = lambda ax, label: next(l for l in ax.get_lines() if l.get_label() == label)
    for i in range(1, students, 2):   # the same colour and style where a panel lacks the even students
        assert (line(loss, f"s{i}").get_color(), line(loss, f"s{i}").get_linestyle()) == \
               (line(val, f"s{i}").get_color(), line(val, f"s{i}").get_linestyle())
    styles = {(l.get_color(), l.get_linestyle()) for l in loss.get_lines()}
    assert len(styles) == students   # no two students share a line


def test_a_markdown_table_and_a_code_block_render_to_their_elements():
    import xml.etree.ElementTree as ET

    text = ("Intro with `k_test`, **bold**, a model <org>/<model> & a path.\n\n"
            "| evaluation | RSUM |\n| --- | --- |\n| eval | 250.0 |\n| eval-student | 223.3 |\n\n"
            "```\nfor i in range(2):\n    print(i < 1)\n```\n")
    root = ET.fromstring(f"<root>{rep.markdown_to_html(text)}</root>")   # well-formed, entities escaped
    intro = root.find("p")
    assert intro.find("code").text == "k_test" and intro.find("strong").text == "bold"
    assert "<org>/<model> & a path" in "".join(intro.itertext())       # text, never raw HTML
    (box,) = root.findall("div")
    assert box.get("class") == "table-scroll" and [t.tag for t in box] == ["table"]
    assert [th.text for th in box.findall("table/thead/tr/th")] == ["evaluation", "RSUM"]
    assert [[td.text for td in tr] for tr in box.findall("table/tbody/tr")] == [["eval", "250.0"],
                                                                                ["eval-student", "223.3"]]
    (code,) = root.findall("pre/code")
    assert code.text == "for i in range(2):\n    print(i < 1)\n"


def test_a_cache_read_as_match_probabilities_is_drawn_on_that_scale_too(full_run, tmp_path):
    run = tmp_path / "run"
    for stage in ("mine", "teacher"):
        shutil.copytree(full_run / stage, run / stage)
    sections = {s.key: s for s in rep.build(run)}
    assert [r[0] for r in table(sections["scores"].text, "| teacher cache |")] == ["teacher"] * 4
    cli("distill", "--run", run, "--max-steps", "1", "--batch-size", "16", "--num-negatives", "4", "--device", "cpu",
        "--teacher-scale", "prob")
    sections = {s.key: s for s in rep.build(run)}
    rows = table(sections["scores"].text, "| teacher cache |")
    assert [r[0] for r in rows] == ["teacher"] * 4 + ["teacher (prob)"] * 4
    # the (prob) rows' teacher moments are those of 1 / (1 + exp(-log-odds)) over the same scores
    raw = {(r[1], r[2]): float(r[3]) for r in rows if r[0] == "teacher (prob)"}
    shards = [r for f in sorted((run / "teacher").glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    for d in ("i2t", "t2i"):
        scores = np.array([s for r in shards if r["direction"] == d for s in r["teacher_scores"]], np.float64)
        assert raw[(d, "teacher (sigmoid(itm))")] == pytest.approx(np.mean(1 / (1 + np.exp(-scores))), abs=1e-3)
    captions = [c for c, _ in sections["positives"].figures]
    assert captions == ["teacher: teacher scores of positives and hard negatives",
                        "teacher (prob): teacher scores of positives and hard negatives"]
