"""The CLI over the stage table: verbs, lazy imports, status; and the one-way arrows between the layers."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli
from stages import STAGES


def test_help_lists_every_stage_of_the_table_and_the_app_verbs():
    out = cli("--help").output
    for verb in [s.verb for s in STAGES] + ["status", "demo", "demo-assets"]:
        assert f"  {verb} " in out, verb


def test_status_and_help_do_not_import_torch(tmp_path):
    code = ("import sys\nfrom cprd_pipeline.cli import main\n"
            "for argv in (['--help'], ['status', '--run', sys.argv[1]]):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = [m for m in ('torch', 'faiss', 'transformers') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    (tmp_path / "run").mkdir()
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    assert "mine" in proc.stdout and "absent" in proc.stdout


def test_status_of_a_missing_run_directory_is_an_error(tmp_path):
    r = cli("status", "--run", tmp_path / "nope", expect=2)
    assert r.output.strip().splitlines()[-1] == f"error: {tmp_path / 'nope'}: no such run directory"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_arrows_run_one_way_cli_to_stages_to_pipeline():
    for f in (REPO / "pipeline").rglob("*.py"):
        bad = {m for m in _imports(f) if m.split(".")[0] in ("stages", "cprd_pipeline")}
        assert not bad, f"{f.relative_to(REPO)} imports {bad}: the framework never imports a layer above it"
    for f in (REPO / "stages").glob("*.py"):
        if f.name == "__init__.py":
            continue
        bad = {m for m in _imports(f) if m.split(".")[0] == "cprd_pipeline" or
               (m.startswith("stages") and m != "stages")}
        assert not bad, f"{f.relative_to(REPO)} imports {bad}: a stage never imports another stage or the app"


def test_the_stage_table_is_the_only_list_of_stages():
    """No other module spells the verbs as a list (status, the CLI and the demo read the table)."""
    verbs = {s.verb for s in STAGES}
    for f in list((REPO / "pipeline").rglob("*.py")) + list((REPO / "cprd_pipeline").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                words = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                assert len(words & (verbs | {"teacher", "eval"})) < 3, f"{f.relative_to(REPO)}: a list of stages"
    for s in STAGES:
        cls, entry = s.load()
        assert callable(entry) and cls.__name__ == s.config


def test_no_branch_on_a_loss_name_outside_the_registry():
    from pipeline.losses import registry

    names = set(registry.names())
    files = list((REPO / "stages").glob("*.py")) + list((REPO / "cprd_pipeline").glob("*.py"))
    files += [f for f in (REPO / "pipeline").rglob("*.py") if "losses" not in f.parts]
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                assert not names & set(consts), f"{f.relative_to(REPO)}:{node.lineno} compares with a loss name"


def test_help_marks_required_options_and_shows_every_default():
    from conftest import cli

    out = " ".join(cli("mine", "--help").output.split())
    assert "--data TEXT [required] annotation file" in out
    assert "[default: false]" in out and "[default: 0]" in out          # --trust-remote-code, --seed


def test_a_storage_error_is_one_line(tmp_path):
    from conftest import cli

    (tmp_path / "file").write_text("x")
    result = cli("mine", "--run", tmp_path / "file" / "run", "--data", tmp_path / "ann.json", "--student", "s",
                 expect=2)
    assert result.output.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in result.output


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.output
    return result.stderr.strip()


@pytest.mark.parametrize("args, line", [
    (("mine", "--stduent", "x"), "error: mine: No such option '--stduent'. Did you mean '--student'?"),
    (("mine", "--index", "kd"), "error: mine: Invalid value for '--index': 'kd' is not one of 'flat', 'ivf', 'hnsw'."),
    (("distill", "--batch-size", "many"), "error: distill: Invalid value for '--batch-size': 'many' is not a valid "
                                          "integer."),
    (("mien",), "error: no such command 'mien' (did you mean 'mine'?)"),
    (("loop", "--config", "p.yaml"), "error: loop: Missing option '--run'."),
])
def test_a_usage_error_is_one_error_line(args, line):
    assert _one_error_line(cli(*args, expect=None)) == line


def test_help_still_works():
    assert "--student" in cli("mine", "--help").output and "Commands" in cli("--help").output


@pytest.mark.parametrize("args, line", [
    (("mine", "--batch-size", "0"), "--batch-size: must be >= 1, got 0"),
    (("mine", "--search-batch", "0"), "--search-batch: must be >= 1, got 0"),
    (("mine", "--num-workers", "-1"), "--num-workers: must be >= 0, got -1"),
    (("mine", "--index", "ivf", "--nprobe", "0"), "--nprobe: must be >= 1, got 0"),
    (("evaluate", "--batch-size", "0"), "--batch-size: must be >= 1, got 0"),
    (("score-teacher", "--batch-size", "0"), "--batch-size: must be >= 1, got 0"),
    (("score-teacher", "--image-batch-size", "0"), "--image-batch-size: must be >= 1, got 0"),
    (("distill", "--image-cache-mb", "-1"), "--image-cache-mb: must be >= 0, got -1.0"),
    (("distill", "--shuffle-buffer", "-1"), "--shuffle-buffer: must be >= 0, got -1"),   # 0: the files' order
    (("train-teacher", "--sample-temperature", "0"), "--sample-temperature: must be > 0, got 0.0"),
])
def test_numeric_options_out_of_range_are_refused_before_anything_is_written(tmp_path, args, line):
    verb, *flags = args
    given = {"--run": tmp_path / "run", "--data": tmp_path / "ann.json", "--student": "s", "--teacher": "t"}
    needed = {"mine": ("--run", "--data", "--student"), "evaluate": ("--run", "--data"),
              "score-teacher": ("--run", "--teacher"), "distill": ("--run",), "train-teacher": ("--run", "--teacher")}
    base = [x for flag in needed[verb] for x in (flag, given[flag])]
    assert _one_error_line(cli(verb, *base, *flags, expect=None)) == f"error: {line}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("verb", ["distill", "train-teacher"])
def test_fp16_on_the_cpu_is_refused_with_what_works_there(tmp_path, verb):
    teacher = ("--teacher", "t") if verb == "train-teacher" else ()
    result = cli(verb, "--run", tmp_path / "run", *teacher, "--mixed-precision", "fp16", "--device", "cpu", expect=None)
    assert _one_error_line(result) == ("error: --mixed-precision fp16 needs a GPU; on the CPU use --mixed-precision "
                                       "bf16 (or no)")
    assert not (tmp_path / "run").exists()
