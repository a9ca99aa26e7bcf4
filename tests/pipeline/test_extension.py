"""A training run continues when only its length grew (pipeline/extension.py)."""
import json

import pytest

from pipeline.errors import PipelineError
from pipeline.extension import Growth

G = Growth(keys=("max_steps", "epochs"), steps=7, checkpoints="checkpoints/latest.json", outputs=("final",))
IDENTITY = {"stage": "distill", "config": {"lr": 1e-4, "max_steps": 7, "epochs": 1}}


def _run(tmp_path, steps=4, finished=True, latest=None):
    (tmp_path / "final").mkdir()
    if finished:
        (tmp_path / "_SUCCESS").write_text("x\n")
    if latest is not None:
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "latest.json").write_text(json.dumps({"step": latest}))
    return {"identity": {**IDENTITY, "config": {**IDENTITY["config"], "max_steps": 4}}, "fingerprint": "f4",
            "status": "complete" if finished else "running", "steps": steps}


@pytest.mark.parametrize("finished,latest,trained", [(True, 3, 4), (False, 3, 3), (False, None, 0)])
def test_a_longer_run_continues_from_what_it_trained(tmp_path, finished, latest, trained):
    old = _run(tmp_path, finished=finished, latest=latest)
    assert G.trained(tmp_path, old, IDENTITY, "elsewhere") == trained


def test_any_other_change_is_no_extension(tmp_path):
    old = _run(tmp_path)
    assert G.trained(tmp_path, old, {**IDENTITY, "config": {**IDENTITY["config"], "lr": 1e-3}}, "x") is None
    assert G.trained(tmp_path, {**old, "identity": "damaged"}, IDENTITY, "x") is None


def test_a_shorter_run_is_refused_with_the_way_out(tmp_path):
    old = _run(tmp_path, steps=9)
    with pytest.raises(PipelineError, match=r"trained 9 steps and --max-steps / --epochs now ask for 7.*--force.*, "
                                            r"or another --out folder$"):
        G.trained(tmp_path, old, IDENTITY, "another --out folder")


def test_extend_removes_the_end_outputs_and_lists_the_runs_it_continues(tmp_path):
    old = {**_run(tmp_path), "extended": [{"fingerprint": "f2", "steps": 2}]}
    said = []
    assert G.extend(tmp_path, old, 4, said.append) == [{"fingerprint": "f2", "steps": 2},
                                                       {"fingerprint": "f4", "steps": 4}]
    assert not (tmp_path / "final").exists() and (tmp_path / "_SUCCESS").exists()   # the writer removes _SUCCESS
    assert said == [f"[{tmp_path.name}] extending: 4 steps trained, continuing to 7 from its last checkpoint (the "
                    "learning-rate schedule is recomputed for the new length)"]
