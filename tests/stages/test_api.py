"""The Python API: a stage's config object in, its output folder out, under the command line's rules."""
import json
import shutil

import pytest

from conftest import cli
from pipeline.errors import PipelineError
from pipeline.losses.cprd import CPRDOptions
from pipeline.losses.kl import KLOptions
from stages import run
from stages.distill import DistillConfig
from stages.mine import MineConfig


def test_config_in_output_folder_out(tmp_path, corpus_file, tiny_clip):
    out = run(MineConfig(run=str(tmp_path / "run"), data=str(corpus_file), student=str(tiny_clip), k=6,
                         shard_size=7))
    assert out == tmp_path / "run" / "mine" and (out / "_SUCCESS").exists()
    # the same settings on the command line: the same fingerprint
    cli("mine", "--run", tmp_path / "cli", "--data", corpus_file, "--student", tiny_clip, "--k", "6",
        "--shard-size", "7")
    fp = lambda d: json.loads((d / "manifest.json").read_text())["fingerprint"]
    assert fp(out) == fp(tmp_path / "cli" / "mine")


def test_unset_loss_options_take_the_losss_defaults(tmp_path, scored_run):
    shutil.copytree(scored_run, tmp_path / "run")
    common = dict(run=str(tmp_path / "run"), max_steps=1, batch_size=16, num_negatives=4, device="cpu")
    out = run(DistillConfig(**common, loss="kl", out=str(tmp_path / "kl")))
    manifest = json.loads((out / "manifest.json").read_text())
    assert out == tmp_path / "kl" and manifest["config"]["loss_options"] == json.loads(json.dumps(
        KLOptions().__dict__))
    with pytest.raises(PipelineError, match="CPRDOptions is not the options of loss 'kl'"):
        run(DistillConfig(**common, loss="kl", loss_options=CPRDOptions()))
    with pytest.raises(PipelineError, match="--loss: 'nope' is not one of"):
        run(DistillConfig(**common, loss="nope"))


def test_something_else_is_refused():
    with pytest.raises(TypeError, match="not the config of a stage"):
        run({"run": "x"})
