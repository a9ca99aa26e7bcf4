"""A loss registered from a module outside the package, with its own options dataclass, is a distill loss as any
other: its option reaches it as a flag, from a pipeline file and through the Python API, and a bad value is
refused in one line before anything is written; on the command line the module is named by CPRD_LOSS_MODULES."""
import importlib
import json
import shutil
import sys

import pytest

from conftest import cli, cli_subprocess
from pipeline.errors import PipelineError
from pipeline.losses import registry

FAST = ("--batch-size", "16", "--num-negatives", "5", "--lr", "2e-3", "--shuffle-buffer", "64", "--device", "cpu")
MODULE = "outside_width_loss"
LOSS = "first-width"

SOURCE = '''
"""A loss outside the package: squared error over the first `width` candidates, recording each width it sees."""
from dataclasses import dataclass

import torch

from pipeline.config import OptionError, option
from pipeline.losses.registry import DistillInputs, register

SEEN = []   # the width of every call


@dataclass
class WidthOptions:
    width: int = option(4, "the first this many candidates count", at_least=1)

    def check(self) -> None:
        if self.width & (self.width - 1):
            raise OptionError("width", f"must be a power of two, got {self.width}")


@register("first-width", WidthOptions, "squared error over the first candidates")
def first_width(x: DistillInputs, o: WidthOptions) -> torch.Tensor:
    SEEN.append(o.width)
    w = min(o.width, x.student.shape[1])
    err = (x.student[:, :w] - x.teacher[:, :w].to(x.student.dtype)).square() * x.mask[:, :w]
    return err.sum() / x.mask[:, :w].sum().clamp(min=1)
'''


@pytest.fixture
def outside(tmp_path, monkeypatch):
    """The module written to tmp_path and imported (which registers its loss); unregistered afterwards."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    module = importlib.import_module(MODULE)
    yield module
    registry.unregister(LOSS)
    sys.modules.pop(MODULE, None)


@pytest.fixture
def run(tmp_path, scored_run):
    shutil.copytree(scored_run, tmp_path / "run")
    return tmp_path / "run"


def distill(run, *extra, expect=0):
    return cli("distill", "--run", run, *FAST, "--loss", LOSS, "--max-steps", "2", *extra, expect=expect)


def loss_options(run):
    return json.loads((run / "distill" / "manifest.json").read_text())["identity"]["config"]["loss_options"]


def error_line(result):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output   # one line, no traceback
    return lines[0]


def test_the_loss_is_listed_and_its_option_is_a_flag(outside):
    assert LOSS in registry.names()
    help_text = cli("distill", "--help").output
    assert LOSS in help_text and "--width" in help_text and "[first-width] the first this many" in \
        " ".join(help_text.split())


def test_its_option_reaches_it_as_a_flag_and_from_a_pipeline_file(outside, run, tmp_path):
    distill(run, "--width", "2")
    assert outside.SEEN and set(outside.SEEN) == {2}
    assert loss_options(run) == {"width": 2}
    f = tmp_path / "pipeline.yaml"
    f.write_text(f"mine:\n  k: 6\ndistill:\n  loss: {LOSS}\n  width: 8\n")
    outside.SEEN.clear()
    cli("distill", "--run", run, *FAST, "--max-steps", "2", "--config", f, "--force")
    assert outside.SEEN and set(outside.SEEN) == {8}
    assert loss_options(run) == {"width": 8}
    # the value is the loss's: its term in metrics.jsonl is the squared error its function computes
    steps = [json.loads(l) for l in (run / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert all(s["loss"] == pytest.approx(s["itc"] + s["distill"], rel=1e-5) for s in steps)


@pytest.mark.parametrize("given, message", [
    (("--width", "3"), "--width: must be a power of two, got 3"),    # the options class's own check
    (("--width", "0"), "--width: must be >= 1, got 0"),              # its declared range
])
def test_a_bad_value_is_refused_in_one_line_before_anything_is_written(outside, run, tmp_path, given, message):
    assert error_line(distill(run, *given, expect=None)) == f"error: {message}"
    f = tmp_path / "c.yaml"
    f.write_text(f"loss: {LOSS}\nwidth: {given[1]}\n")
    line = error_line(cli("distill", "--run", run, *FAST, "--config", f, expect=None))
    assert line == f"error: --config {f}: {message}"
    assert not (run / "distill").exists() and not outside.SEEN


def test_the_python_api_checks_it_as_the_command_line_does(outside, run):
    import stages
    from stages.distill import DistillConfig

    config = DistillConfig(run=str(run), loss=LOSS, loss_options=outside.WidthOptions(width=6), device="cpu")
    with pytest.raises(PipelineError, match=r"^--width: must be a power of two, got 6$"):
        stages.run(config)
    config = stages.stage("distill").prepare(run=str(run), loss=LOSS, width=4)[0]
    assert config.loss_options == outside.WidthOptions(width=4)
    assert not (run / "distill").exists()


def test_the_command_line_imports_the_module_named_in_the_environment(run, tmp_path):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{MODULE}.py").write_text(SOURCE)
    from conftest import REPO

    env = {"PYTHONPATH": f"{REPO}:{tmp_path / 'mods'}", registry.MODULES_VARIABLE: MODULE}
    proc = cli_subprocess("distill", "--run", run, *FAST, "--loss", LOSS, "--width", "3", env=env)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == \
        "error: --width: must be a power of two, got 3", proc.stderr
    proc = cli_subprocess("distill", "--run", run, "--loss", LOSS, env={registry.MODULES_VARIABLE: "no_such_losses"})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "error: CPRD_LOSS_MODULES: cannot import 'no_such_losses'"), proc.stderr
    assert not (run / "distill").exists()
