"""The demo end to end in --quick mode, with the committed demo models."""
import json
import math
import re
from pathlib import Path

import pytest

from conftest import cli, parse_report_html

ASSETS = Path(__file__).resolve().parents[2] / "data" / "demo"
pytestmark = pytest.mark.skipif(not (ASSETS / "student.safetensors").exists(), reason="demo assets not built")


def test_quick_demo_runs_every_path_and_enforces_the_teacher_check(tmp_path):
    import yaml

    out = tmp_path / "demo"
    tour = ASSETS.parent / "demo-tour.yaml"
    first = cli("demo", "--quick", "--full", "--allow-weak-teacher", "--recipe", tour, "--out", out, "--device", "cpu")
    report = (out / "report.md").read_text()
    recipe = yaml.safe_load(tour.read_text())
    # --full through the loop: round 2's round 1 is the demo's own (linked, found up to date, not made again),
    # and round 2 mined with that round-1 student; the fine-tuned teacher was trained once for both seeds
    name = recipe["full"]["method"]
    for s in (0, 1):
        r1 = out / "loop" / f"{name}-s{s}" / "round-1"
        assert (r1 / "distill").resolve() == (out / "students" / f"{name}-s{s}").resolve()
        mined = json.loads((r1.parent / "round-2" / "mine" / "manifest.json").read_text())
        assert mined["locations"]["student"] == str((out / "students" / f"{name}-s{s}" / "final").resolve())
    assert first.output.count("[distill] up to date") == 2 and first.output.count("[teacher-train] up to date") == 1
    trained = [p.parent for p in out.glob("**/teacher-train/_SUCCESS") if not p.parent.is_symlink()]
    assert trained == [out / "run" / "teacher-train"]
    labels = [m["label"] for m in recipe["methods"]]
    full = next(m["label"] for m in recipe["methods"] if m["name"] == recipe["full"]["method"])
    extra = [f"round 2: {full}, re-mined with its round-1 student", "teacher re-rank, fine-tuned on the student's",
             f"{full}, teacher fine-tuned on the student's negatives"]           # --full
    for row in ["student (before distillation)", "teacher re-rank, ITM + ITC", "teacher re-rank, ITM only"] + labels + extra:
        assert f"| {row}" in report, row
    data = json.loads((out / "report.json").read_text())
    for label in labels:  # two seeds each (quick), each with rank agreement and false-negative counts
        assert len(data[label]) == 2, label
        for m in data[label]:
            assert -1 <= m["agreement"]["t2i"]["kendall_tau"] <= 1 and m["false_negatives_per_epoch"] >= 0
            assert m["rsum_per_gallery"] == [pytest.approx(m["rsum"])]   # quick mode: one gallery
    assert recipe["baseline"] in [m["name"] for m in recipe["methods"]]
    assert "vs none" in report and "sd)" in report  # each row against the baseline, in pooled standard deviations
    assert "Kendall tau" in report and "false neg." in report
    # the run report of everything under OUT, with the demo's table as its first section
    checker = parse_report_html(out / "report" / "index.html")
    assert checker.sections == ["demo", "scores", "positives", "agreement", "training", "evaluations"]
    # each drawn once (its scores, positives and agreement): a loop's link to a cache is not another cache
    caches = len([p for p in out.glob("**/teacher/_SUCCESS") if not p.parent.is_symlink()])
    assert not checker.missing and caches >= 3 and len(checker.images) == 3 * caches + 2
    # the committed teacher beats the student, so without --allow-weak-teacher the demo passes its check (the
    # losing side is the next test's)
    student = data["student (before distillation)"][0]["rsum"]
    teacher = data["teacher re-rank, ITM + ITC (top 16)"][0]["rsum"]
    assert teacher > student + 20, (teacher, student)
    again = cli("demo", "--quick", "--full", "--recipe", tour, "--out", out, "--device", "cpu")
    assert f"teacher re-rank RSUM {teacher:.1f} > student {student:.1f}: distilling" in again.output
    assert "does not beat the student" not in again.output
    assert again.output.count("up to date") >= 3  # mine and both teacher caches are re-used
    # --methods: a subset of the recipe's rows (its baseline kept), re-using what is done; unknown names refused
    kl_name = next(m["name"] for m in recipe["methods"] if m["loss"] == "kl")
    cli("demo", "--quick", "--recipe", tour, "--methods", kl_name, "--out", out, "--device", "cpu")
    subset = json.loads((out / "report.json").read_text())
    baseline = next(m["label"] for m in recipe["methods"] if m["name"] == recipe["baseline"])
    assert [l for l in subset if l in labels] == [l for l in labels if l in (baseline, _label(recipe, kl_name))]
    refused = cli("demo", "--quick", "--recipe", tour, "--methods", f"{kl_name},hinge", "--out", out, "--device", "cpu",
                  expect=2)
    assert "--methods: hinge not in" in refused.output.strip().splitlines()[-1]

    # an edited recipe makes the distilled students stale: refused with the change named, replaced with --force
    import yaml

    recipe = yaml.safe_load(tour.read_text())
    recipe["assets"] = str(ASSETS)
    kl = next(m for m in recipe["methods"] if m["loss"] == "kl")
    kl["teacher_temperature"] = 7.0
    kl["max_teacher_margin"] = 0.0     # its drops are counted in the report
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(recipe))
    args = ("demo", "--quick", "--allow-weak-teacher", "--recipe", tmp_path / "edited.yaml", "--out", out,
            "--device", "cpu")
    refused = cli(*args, expect=2)
    assert "teacher_temperature" in refused.output.strip().splitlines()[-1]
    forced = cli(*args, "--force")
    assert forced.output.count("up to date") >= 3  # stage one is still re-used
    manifest = json.loads((out / "students" / "kl-s0" / "manifest.json").read_text())
    assert manifest["config"]["loss_options"]["teacher_temperature"] == 7.0
    dropped = [m["dropped_by_margin_per_epoch"] for m in json.loads((out / "report.json").read_text())[kl["label"]]]
    assert all(d > 0 for d in dropped) and f" + {sum(dropped) / 2:,.0f} by margin |" in (out / "report.md").read_text()


def _label(recipe: dict, name: str) -> str:
    return next(m["label"] for m in recipe["methods"] if m["name"] == name)


def test_demo_stops_before_distilling_when_the_teacher_loses(tmp_path, tiny_blip):
    """An untrained teacher re-ranks the student's candidates at random: the demo must stop, distilling nothing."""
    import shutil

    import yaml

    from pipeline.demo.corpus import captions, combinations
    from pipeline.demo.models import demo_token_ids, pack

    assets = tmp_path / "assets"
    assets.mkdir()
    for name in ("student.safetensors", "assets.json"):
        shutil.copy(ASSETS / name, assets / name)
    tokens = demo_token_ids([c for combo in combinations() for c in captions(combo)])
    pack(tiny_blip, assets / "teacher.safetensors", "teacher", tokens, {})
    recipe = yaml.safe_load((ASSETS.parent / "demo-tour.yaml").read_text())
    recipe["assets"] = str(assets)
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "demo"
    result = cli("demo", "--quick", "--recipe", tmp_path / "demo.yaml", "--out", out, "--device", "cpu", expect=None)
    assert result.exit_code == 2
    assert "does not beat the student" in result.output.strip().splitlines()[-1]
    assert not (out / "students").exists() and not (out / "report.md").exists()


def test_per_gallery_difference_is_each_gallerys_seed_mean_minus_the_baselines():
    from cprd_pipeline.demo_report import _per_gallery

    runs = [{"rsum_per_gallery": [300.0, 310.0, 290.0]}, {"rsum_per_gallery": [304.0, 300.0, 296.0]}]
    none = [{"rsum_per_gallery": [301.0, 302.0, 299.0]}, {"rsum_per_gallery": [299.0, 306.0, 295.0]},
            {"rsum_per_gallery": [300.0, 304.0, 300.0]}]
    diffs = []
    for g in range(3):   # a naive loop over galleries, then seeds
        mine = sum(r["rsum_per_gallery"][g] for r in runs) / len(runs)
        base = sum(r["rsum_per_gallery"][g] for r in none) / len(none)
        diffs.append(mine - base)
    mean = sum(diffs) / 3
    stderr = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2 / 3)
    expected = " / ".join(f"{d:+.1f}" for d in diffs) + f" ({mean:+.1f} ± {stderr:.1f})"
    assert _per_gallery(runs, none) == expected == "+2.0 / +1.0 / -5.0 (-0.7 ± 2.2)"


@pytest.mark.parametrize("reference, want", [(None, 100 * (3.0 - 1.0) / (12.0 - 1.0)),
                                              (1, 100 * (11.0 - 0.0) / (12.0 - 0.0))])
def test_the_gap_closed_is_taken_on_the_galleries_the_teacher_re_ranked(reference, want):
    """With the teacher's row on the first gallery only, the students are compared with it on that gallery."""
    import dataclasses

    from cprd_pipeline.demo_recipe import Recipe
    from cprd_pipeline.demo_report import Row, Setting, _closing

    recipe = Recipe.load(ASSETS.parent / "demo.yaml")
    recipe = dataclasses.replace(recipe, evaluate=dataclasses.replace(recipe.evaluate, reference_galleries=reference))
    run = lambda *g: {"rsum": sum(g) / len(g), "rsum_per_gallery": list(g)}
    none = Row("none", "none", [run(0.0, 2.0), run(0.0, 2.0)])                 # 1.0 on both galleries, 0.0 on the first
    best = Row("kl", "kl", [run(10.0, -4.0), run(12.0, -6.0)])                # 3.0 on both, 11.0 on the first
    text = _closing(Setting(recipe, None, "test", 2, {}), [none, best], 12.0, none)
    assert f"closes {want:.1f}% of the RSUM gap" in text
    assert ("on the first gallery, the one the teacher re-ranked" in text) == (reference == 1)


def test_a_test_run_in_a_val_runs_folder_adds_its_galleries_and_keeps_the_train_split(tmp_path):
    from dataclasses import replace

    from cprd_pipeline.demo import _prepare_data
    from cprd_pipeline.demo_recipe import Corpus

    corpus = Corpus(seed=3, held_out=40, train_images=12, galleries=2)
    logged = []
    train, val = _prepare_data(corpus, "val", tmp_path, logged.append)
    assert [g.name for g in val] == ["val.json", "val-1.json"]
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data").glob("*.json")}
    train2, test = _prepare_data(corpus, "test", tmp_path, logged.append)
    assert train2 == train and [g.name for g in test] == ["test.json", "test-1.json"]
    assert "splits test, test-1" in logged[-1]                       # only the missing galleries were made
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data").glob("*.json")}
    assert all(after[name] == t for name, t in before.items() if name != "spec.json")
    spec = json.loads((tmp_path / "data" / "spec.json").read_text())
    assert spec["seed"] == 3 and spec["splits"] == ["test", "test-1", "train", "val", "val-1"]
    n = len(logged)
    _prepare_data(corpus, "val", tmp_path, logged.append)           # everything there: nothing generated
    assert len(logged) == n
    _prepare_data(replace(corpus, seed=4), "val", tmp_path, logged.append)   # another corpus: made again
    assert "splits train, val, val-1" in logged[-1]
    assert json.loads((tmp_path / "data" / "spec.json").read_text())["splits"] == ["train", "val", "val-1"]


def test_the_default_recipe_runs_on_its_student_only_assets_with_the_demo_teacher(tmp_path):
    """data/demo.yaml as shipped (the default recipe; quick mode, its CPRD row and the baseline): the assets folder
    holds only the 128x4 student, the teacher comes from the folder its assets.json names, and the CPRD row trains
    with distill's default lists. data/demo-transfer.yaml is the same setting with the whole lists."""
    import yaml

    recipe = yaml.safe_load((ASSETS.parent / "demo.yaml").read_text())
    transfer = yaml.safe_load((ASSETS.parent / "demo-transfer.yaml").read_text())
    assert transfer["distill"]["out_of_batch"] == "encode" and "out_of_batch" not in recipe["distill"]
    assert transfer["assets"] == recipe["assets"] and transfer["mine"] == recipe["mine"]
    chosen = next(m for m in recipe["methods"] if m["loss"] == "cprd-kl")
    out = tmp_path / "demo"
    cli("demo", "--quick", "--allow-weak-teacher", "--methods", chosen["name"], "--out", out, "--device", "cpu")
    data = json.loads((out / "report.json").read_text())
    assert [l for l in data if l.startswith("loss=")] == [_label(recipe, recipe["baseline"]), chosen["label"]]
    from cprd_pipeline.demo import _digest
    assert (out / "models" / "teacher" / "asset.sha256").read_text() == _digest(ASSETS / "teacher.safetensors")
    student = json.loads((out / "models" / "student" / "config.json").read_text())
    assert student["vision_config"]["num_hidden_layers"] == 4 and student["vision_config"]["hidden_size"] == 128
    manifest = json.loads((out / "students" / f"{chosen['name']}-s0" / "manifest.json").read_text())
    assert manifest["config"]["num_negatives"] == recipe["mine"]["k"] == 32
    assert manifest["config"]["loss_options"]["kl_weight"] == chosen["kl_weight"]
    assert (manifest["config"]["batch_size"], manifest["config"]["lr"]) == (recipe["distill"]["batch_size"], chosen["lr"])
    # the lists as trained: 3 outside items per query of the batch
    assert (manifest["config"]["out_of_batch"], manifest["config"]["out_of_batch_budget"]) == ("budget", 3 * 256)
    baseline = json.loads((out / "students" / f"{recipe['baseline']}-s0" / "manifest.json").read_text())["config"]
    assert (baseline["batch_size"], baseline["lr"]) == (64, 2e-4)   # none keeps its own (recipe's method overrides)


def test_an_assets_folder_without_a_teacher_needs_teacher_from_naming_one(tmp_path):
    import shutil

    from cprd_pipeline.demo import _prepare_models
    from pipeline.errors import PipelineError

    assets = tmp_path / "assets"
    assets.mkdir()
    shutil.copy(ASSETS / "student.safetensors", assets / "student.safetensors")
    meta = json.loads((ASSETS / "assets.json").read_text())
    (assets / "assets.json").write_text(json.dumps(meta))
    with pytest.raises(PipelineError, match=r"assets.json: no teacher.safetensors beside it and no `teacher_from`"):
        _prepare_models(assets, tmp_path / "out", print)
    (assets / "assets.json").write_text(json.dumps({**meta, "teacher_from": str(tmp_path)}))
    with pytest.raises(PipelineError, match=re.escape(f"teacher_from '{tmp_path}' holds no teacher.safetensors")):
        _prepare_models(assets, tmp_path / "out", print)
    assert not (tmp_path / "out").exists()          # nothing unpacked before the teacher was found
    (assets / "assets.json").write_text(json.dumps({**meta, "teacher_from": "data/demo"}))   # the repository's
    student, teacher, got = _prepare_models(assets, tmp_path / "out", print)
    assert got["teacher_from"] == "data/demo" and (teacher / "config.json").exists() and (student / "config.json").exists()
    (assets / "assets.json").unlink()
    with pytest.raises(PipelineError, match="no demo models"):
        _prepare_models(assets, tmp_path / "out2", print)
