"""`cprd-pipeline loop`: rounds chain their students and teachers, a killed loop resumes without recomputing a
finished round, status shows the rounds, and the pipeline file is checked."""
import json
import signal

import pytest
import yaml

from conftest import cli, cli_subprocess, write_albef_corpus


def pipeline_file(tmp_path, corpus_file, tiny_clip, tiny_blip, **extra):
    test = write_albef_corpus(tmp_path / "test", n_images=10, seed=1)
    spec = {
        "device": "cpu",
        "mine": {"data": str(corpus_file), "student": str(tiny_clip), "k": 6, "shard-size": 7},
        "train-teacher": {"max-steps": 2, "train": "head", "lr": 1e-3, "batch-size": 16},
        "score-teacher": {"teacher": str(tiny_blip)},
        "distill": {"max-steps": 2, "batch-size": 16, "num-negatives": 4},
        "evaluate": {"data": str(test), "rerank-teacher": str(tiny_blip), "k-test": 4},
        **extra,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_two_rounds_chain_students_and_teachers_and_resume_after_a_kill(tmp_path, corpus_file, tiny_clip, tiny_blip):
    config, root = pipeline_file(tmp_path, corpus_file, tiny_clip, tiny_blip), tmp_path / "loop"
    cli("loop", "--run", root, "--config", config, "--rounds", "1")
    first = {d: manifest(root / "round-1" / d)["created"] for d in ("mine", "teacher-train", "teacher", "distill", "eval")}
    # round 2 is killed in its first training step (train-teacher), then resumed
    proc = cli_subprocess("loop", "--run", root, "--config", config, "--rounds", "2", env={"CPRD_FAULT": "step:1"})
    assert proc.returncode == -signal.SIGKILL and (root / "round-2" / "mine" / "_SUCCESS").exists()
    out = cli("loop", "--run", root, "--config", config, "--rounds", "2").output
    assert {d: manifest(root / "round-1" / d)["created"] for d in first} == first   # round 1 never recomputed
    r1, r2 = root / "round-1", root / "round-2"
    # round 2 mined with round 1's distilled student, fine-tuned round 1's fine-tuned teacher, scored with it
    assert manifest(r2 / "mine")["locations"]["student"] == str((r1 / "distill" / "final").resolve())
    assert manifest(r2 / "teacher-train")["locations"]["teacher"] == str((r1 / "teacher-train" / "final").resolve())
    assert manifest(r2 / "teacher")["identity"]["lineage"]["fingerprint"] == manifest(r2 / "teacher-train")["fingerprint"]
    # the per-round table: the starting student, then each round with its change
    start = json.loads((root / "eval-start" / "metrics.json").read_text())["rsum"]
    r1_rsum = json.loads((r1 / "eval" / "metrics.json").read_text())["rsum"]
    assert f"| 0 | the starting student | {start:.1f} |" in out
    assert f"| 1 | round-1/distill/final | {r1_rsum:.1f} | {r1_rsum - start:+.1f} |" in out
    assert "| 2 | round-2/distill/final |" in out

    status = cli("status", "--run", root).output.splitlines()
    assert status[0] == "round-1:" and "round-2:" in status
    assert sum("distill" in line and "complete" in line for line in status) == 2

    # the report: the starting student is the one evaluated in eval-start, not round 1's
    cli("report", "--run", root)
    recall = (root / "report" / "report.md").read_text().split("| evaluation | model | i2t R@1")[1]
    row = lambda label: next(l for l in recall.splitlines() if l.startswith(f"| {label} |"))
    assert row("eval-start").endswith("| (the starting student) |")
    assert row("round-1/eval").endswith(f"| {r1_rsum - start:+.1f} |")


def test_the_pipeline_file_is_checked(tmp_path, corpus_file, tiny_clip, tiny_blip):
    bad = pipeline_file(tmp_path, corpus_file, tiny_clip, tiny_blip, distill={"student": "x"})
    assert "distill's `student` is set by the loop" in cli("loop", "--run", tmp_path / "l", "--config", bad,
                                                           expect=2).output
    bad = pipeline_file(tmp_path, corpus_file, tiny_clip, tiny_blip, student="x")   # top level: distill would read it
    assert "distill's `student` is set by the loop" in cli("loop", "--run", tmp_path / "l", "--config", bad,
                                                           expect=2).output
    bad = pipeline_file(tmp_path, corpus_file, tiny_clip, tiny_blip, devcie="cpu")
    assert "top-level option 'devcie' belongs to no verb (did you mean 'device'?)" in \
        cli("loop", "--run", tmp_path / "l", "--config", bad, expect=2).output
    assert not (tmp_path / "l").exists()


def test_the_pipeline_files_device_reaches_every_stage_unless_a_flag_overrides_it(tmp_path, monkeypatch, corpus_file,
                                                                                 tiny_clip, tiny_blip):
    from cprd_pipeline import rounds
    from stages import Stage

    calls = []    # (verb, the config the stage was resolved to): each stage's entry point is replaced, not its resolution
    real_load = Stage.load
    monkeypatch.setattr(Stage, "load", lambda self: (real_load(self)[0],
                                                     lambda cfg, verb=self.verb: calls.append((verb, cfg)) or tmp_path))
    config = pipeline_file(tmp_path, corpus_file, tiny_clip, tiny_blip)
    cli("loop", "--run", tmp_path / "l", "--config", config, "--rounds", "1")      # the command line, no --device
    assert [verb for verb, _ in calls] == ["evaluate", "mine", "train-teacher", "score-teacher", "distill", "evaluate"]
    assert all(cfg.device == "cpu" for _, cfg in calls)            # the file's `device: cpu`, not auto
    assert [cfg.run for verb, cfg in calls if verb != "evaluate"] == [str(tmp_path / "l" / "round-1")] * 4
    calls.clear()
    rounds.run(rounds.LoopConfig(run=str(tmp_path / "l"), rounds=1, pipeline=str(config), device="cuda"))
    assert len(calls) == 6 and all(cfg.device == "cuda" for _, cfg in calls)


def record_stages(monkeypatch, tmp_path) -> list:
    """(verb, resolved config) of each stage the loop runs; the stages' entry points are replaced, not their
    resolution or checks."""
    from stages import Stage

    calls = []
    real_load = Stage.load
    monkeypatch.setattr(Stage, "load", lambda self: (real_load(self)[0],
                                                     lambda cfg, verb=self.verb: calls.append((verb, cfg)) or tmp_path))
    return calls


@pytest.mark.parametrize("section, values, line", [
    ("distill", {"max-steps": 2, "num-negative": 4},
     "({s}:): unknown option 'num-negative' (did you mean 'num-negatives'?)"),
    ("distill", {"max_steps": 2, "num_negative": 4},
     "({s}:): unknown option 'num_negative' (did you mean 'num_negatives'?)"),
    ("score-teacher", {"teacher": "t", "batch-size": 0}, "({s}:): --batch-size: must be >= 1, got 0"),
    ("distill", {"max-steps": 2, "cluster-size": 8}, "--cluster-size sizes the clusters of --batching packed"),
    ("train-teacher", {"max-steps": 2, "mixed-precision": "fp16"}, "--mixed-precision fp16 needs a GPU"),
])
def test_every_section_is_resolved_and_checked_before_any_stage_runs(tmp_path, monkeypatch, corpus_file, tiny_clip,
                                                                      tiny_blip, section, values, line):
    calls = record_stages(monkeypatch, tmp_path)
    config = pipeline_file(tmp_path, corpus_file, tiny_clip, tiny_blip, **{section: values})
    result = cli("loop", "--run", tmp_path / "l", "--config", config, expect=2)
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.output
    assert line.format(s=section) in result.stderr
    assert calls == [] and not (tmp_path / "l").exists()


def test_rounds_below_one_are_refused(tmp_path, corpus_file, tiny_clip, tiny_blip):
    config = pipeline_file(tmp_path, corpus_file, tiny_clip, tiny_blip)
    result = cli("loop", "--run", tmp_path / "l", "--config", config, "--rounds", "0", expect=2)
    assert result.stderr.strip() == "error: --rounds: must be >= 1, got 0"


def test_the_round_table_is_the_result_on_stdout(tmp_path, monkeypatch, corpus_file, tiny_clip, tiny_blip):
    calls = record_stages(monkeypatch, tmp_path)
    root = tmp_path / "l"
    for folder, rsum in (("eval-start", 50.0), ("round-1/eval", 62.5)):
        (root / folder).mkdir(parents=True)
        (root / folder / "metrics.json").write_text(json.dumps({"rsum": rsum}))
    config = pipeline_file(tmp_path, corpus_file, tiny_clip, tiny_blip)
    result = cli("loop", "--run", root, "--config", config, "--rounds", "1")
    assert len(calls) == 6
    assert "| 0 | the starting student | 50.0 |" in result.stdout
    assert "| 1 | round-1/distill/final | 62.5 | +12.5 |" in result.stdout
    assert "RSUM" not in result.stderr and "[loop] round 1 of 1" in result.stderr
