"""distill while it trains and after: validation on a held-out corpus, the best checkpoint, trackers, the model
card. Validation numbers are checked against the evaluate stage run on the saved weights."""
import json
import shutil
import signal
import struct

import pytest
import torch
from safetensors.torch import load_file

from conftest import captions, cli, cli_subprocess, write_albef_corpus, write_images

FAST = ("--batch-size", "16", "--num-negatives", "5", "--lr", "2e-3", "--shuffle-buffer", "64", "--device", "cpu")


@pytest.fixture
def run(tmp_path, scored_run):
    shutil.copytree(scored_run, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture(scope="module")
def val_data(tmp_path_factory):
    return write_albef_corpus(tmp_path_factory.mktemp("val") / "data", n_images=12, seed=1)


def metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


VAL = ("--max-steps", "6", "--eval-every", "2", "--keep-best", "--val-k-test", "6")


def test_validation_rows_the_best_checkpoint_and_its_card_match_evaluate(run, val_data, tiny_blip, tmp_path):
    result = cli("distill", "--run", run, *FAST, *VAL, "--val-data", val_data)
    out = run / "distill"
    rows = metrics(out)
    validated = [r for r in rows if "val_rsum" in r]
    assert [r["step"] for r in validated] == [2, 4, 6]
    assert all("val_rsum" not in r for r in rows if r["step"] % 2)
    assert "val_rsum=" in result.output                     # the progress bar shows the last RSUM

    best = max(validated, key=lambda r: (r["val_rsum"], -r["step"]))   # the first of equal RSUMs
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["best"] == {"dir": "best", "step": best["step"], "val_rsum": best["val_rsum"]}
    assert "best/model.safetensors" in manifest["shards"]
    # the saved best weights, evaluated by the evaluate stage with the run's teacher, give the logged numbers
    cli("evaluate", "--model", out / "best", "--data", val_data, "--rerank-teacher", tiny_blip, "--k-test", "6",
        "--out", tmp_path / "eval-best", "--device", "cpu")
    ev = json.loads((tmp_path / "eval-best" / "metrics.json").read_text())
    assert ev["rsum"] == pytest.approx(best["val_rsum"], abs=1e-6)
    assert ev["t2i"]["R@1"] == pytest.approx(best["val_t2i_R@1"], abs=1e-6)
    assert ev["agreement"]["i2t"]["kendall_tau"] == pytest.approx(best["val_i2t_kendall_tau"], abs=1e-5)
    assert ev["rerank"]["rsum"] == pytest.approx(best["val_rerank_rsum"], abs=1e-6)

    card = (out / "final" / "README.md").read_text()
    assert card.startswith("---\n") and "model-index:" in card and "cprd-pipeline" in card
    for text in ("after 6 optimizer steps", "loss: cprd", str(val_data), "teacher: local folder",
                 f"{validated[-1]['val_rsum']:.3f}", "(split `val`)", "split: val"):   # --val-split's default, named
        assert text in card, text
    best_card = (out / "best" / "README.md").read_text()
    assert f"at step {best['step']} (the best validation RSUM of the run)" in best_card


def test_resume_keeps_the_best_so_far(run, val_data, tmp_path):
    ref = tmp_path / "ref"
    shutil.copytree(run, ref)
    args = (*FAST, *VAL, "--val-data", val_data, "--save-every", "3", "--no-val-teacher")
    cli("distill", "--run", ref, *args)
    proc = cli_subprocess("distill", "--run", run, *args, env={"CPRD_FAULT": "step:5"})
    assert proc.returncode == -signal.SIGKILL
    state = json.loads((run / "distill" / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert state["best"]["step"] == 2                      # the record travels with the checkpoint
    cli("distill", "--run", run, *args)
    want, got = [json.loads((r / "distill" / "manifest.json").read_text())["best"] for r in (ref, run)]
    assert got["step"] == want["step"] and got["val_rsum"] == pytest.approx(want["val_rsum"], abs=1e-6)
    a, b = load_file(run / "distill" / "best" / "model.safetensors"), load_file(ref / "distill" / "best" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_validation_out_of_gpu_memory_is_one_line(run, val_data, monkeypatch):
    import pipeline.validation as validation

    def never_fits(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(validation, "evaluate_retrieval", never_fits)
    result = cli("distill", "--run", run, *FAST, *VAL, "--val-data", val_data, "--save-every", "1", expect=2)
    line = result.output.strip().splitlines()[-1]
    assert line == ("error: out of GPU memory validating, at one item per batch, beside the training state: rerun "
                    "with --no-val-teacher (the teacher stays off the GPU) and --force (a new run)"), line
    out = run / "distill"
    assert [r["step"] for r in metrics(out)] == [1]          # step 2's row waits for its validation
    assert (out / "checkpoints" / "step-1").is_dir() and not (out / "final").exists()


def read_events(folder):
    """Scalars {tag: [(step, value)]} of every TensorBoard event file under folder (TFRecord framing: length,
    its CRC, the record, its CRC)."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
            at += 12 + n + 4
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


def test_report_to_tensorboard_logs_every_named_term(run):
    pytest.importorskip("tensorboardX")
    cli("distill", "--run", run, *FAST, "--max-steps", "3", "--report-to", "tensorboard")
    scalars = read_events(run / "distill" / "trackers")
    rows = metrics(run / "distill")
    for key in ("loss", "itc", "distill", "lr", "logit_scale", "false_negatives"):
        assert [s for s, _ in scalars[key]] == [1, 2, 3], key
        assert [v for _, v in scalars[key]] == pytest.approx([r[key] for r in rows], rel=1e-6), key


@pytest.mark.parametrize("flags, message", [
    (("--report-to", "nosuch"), "--report-to: unknown tracker 'nosuch'"),
    (("--report-to", "swanlab"), "--report-to swanlab: its package is not installed (pip install swanlab)"),
    (("--eval-every", "2"), "--eval-every needs --val-data"),
    (("--keep-best",), "--keep-best needs --val-data"),
    (("--val-data", "x.json", "--eval-every", "0"), "--eval-every: must be >= 1, got 0"),
    (("--val-image-root", "imgs"), "--val-image-root needs --val-data"),
    (("--val-caption-column", "captions"), "--val-caption-column needs --val-data"),
    (("--val-data", "x.json", "--val-format", "parquet"), "Invalid value for '--val-format'"),
])
def test_bad_options_are_refused_before_anything_is_written(run, flags, message):
    result = cli("distill", "--run", run, *FAST, "--max-steps", "2", *flags, expect=2)
    assert message in result.output
    assert not (run / "distill").exists()


def test_sentence_transformers_loads_final_with_the_pipelines_embeddings(run, corpus_file):
    st = pytest.importorskip("sentence_transformers")
    import numpy as np
    from PIL import Image

    from pipeline.models import DualEncoder

    cli("distill", "--run", run, *FAST, "--max-steps", "1")
    final = run / "distill" / "final"
    model = st.SentenceTransformer(str(final), device="cpu")
    enc = DualEncoder(str(final))
    records = json.loads(corpus_file.read_text())
    texts = [c for r in records[:3] for c in r["caption"]]
    paths = [str(corpus_file.parent / r["image"]) for r in records[:3]]
    np.testing.assert_allclose(model.encode(texts), enc.encode_texts(texts, progress=False), atol=1e-5)
    images = [Image.open(p).convert("RGB") for p in paths]
    np.testing.assert_allclose(model.encode(images), enc.encode_images(paths, progress=False), atol=1e-5)



# ---------------------------------------------------------------- the validation corpus's own options
ONE_STEP = ("--max-steps", "1", "--no-val-teacher")


def karpathy_val(root):
    """A Karpathy file whose image paths are relative to a folder that is not the file's own."""
    names = write_images(root / "elsewhere", 6, seed=2)
    doc = {"images": [{"filepath": "", "filename": n, "split": "val" if i < 4 else "test", "cocoid": i,
                       "sentences": [{"raw": c, "sentid": 10 * i + j} for j, c in enumerate(captions(i, 2))]}
                      for i, n in enumerate(names)]}
    (root / "ann").mkdir()
    (root / "ann" / "dataset_val.json").write_text(json.dumps(doc))
    return root / "ann" / "dataset_val.json", root / "elsewhere"


def test_a_karpathy_val_file_reads_its_images_from_val_image_root(run, tmp_path):
    ann, images = karpathy_val(tmp_path / "val")
    result = cli("distill", "--run", run, *FAST, *ONE_STEP, "--val-data", ann, expect=2)
    assert "image file not found" in result.output and "pass --val-image-root)" in result.output
    assert not (run / "distill" / "final").exists()
    # --image-root is RUN/mine's images, not the validation corpus's
    result = cli("distill", "--run", run, *FAST, *ONE_STEP, "--val-data", ann, "--image-root", images, expect=2)
    assert "pass --val-image-root)" in result.output
    result = cli("distill", "--run", run, *FAST, *ONE_STEP, "--val-data", ann, "--val-image-root", images)
    assert "[corpus] 4 images, 8 captions" in result.output      # the val split of the Karpathy file
    assert "val_rsum" in metrics(run / "distill")[-1]
    config = json.loads((run / "distill" / "manifest.json").read_text())["identity"]["config"]
    assert "val_image_root" not in config                         # where the images are is not what is trained


def imagefolder_val(folder):
    """An imagefolder (metadata.jsonl) whose captions are a list in a column named 'captions'."""
    names = write_images(folder, 4, seed=3)
    with open(folder / "metadata.jsonl", "w") as f:
        for i, n in enumerate(names):
            f.write(json.dumps({"file_name": n, "captions": captions(i, 2)}) + "\n")
    return folder


def test_an_imagefolder_val_corpus_names_its_caption_column(run, tmp_path):
    folder = imagefolder_val(tmp_path / "val")
    args = (*FAST, *ONE_STEP, "--val-data", folder, "--val-split", "train")
    result = cli("distill", "--run", run, *args, expect=2)
    assert "no column 'text' (columns: image, captions); name the column with --val-caption-column" in result.output
    result = cli("distill", "--run", run, *args, "--val-caption-column", "captions")
    assert "[corpus] 4 images, 8 captions" in result.output
    assert "val_rsum" in metrics(run / "distill")[-1]
    config = json.loads((run / "distill" / "manifest.json").read_text())["identity"]["config"]
    assert config["val_caption_column"] == "captions"             # another column is other validation data


def test_the_val_corpus_options_leave_existing_fingerprints_alone(tmp_path):
    from pipeline.config import fingerprinted, resolve
    from stages import VERBS
    from stages.distill import VAL_SOURCE, DistillConfig

    def identity(config_file=None, **values):
        return fingerprinted(resolve(DistillConfig, config_file, {"run": "r", "val_data": "v.json", **values},
                                     "distill", VERBS))

    before = identity()
    assert not set(VAL_SOURCE) & set(before)          # what a run made before these options recorded
    assert identity(val_image_root=str(tmp_path), val_format="auto", val_caption_column="text") == before
    assert identity(val_caption_column="captions") == {**before, "val_caption_column": "captions"}
    assert identity(val_format="karpathy") == {**before, "val_format": "karpathy"}
    # in a pipeline file they are plain keys of the distill section (as the loop runs it)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("mine: {student: s}\ndistill: {val-format: hf, val_image_root: imgs, "
                        "val-caption-column: captions, val-split: train}\n")
    cfg = resolve(DistillConfig, pipeline, {"run": "r", "val_data": "v"}, "distill", VERBS)
    assert (cfg.val_format, cfg.val_image_root, cfg.val_caption_column, cfg.val_split) == \
        ("hf", "imgs", "captions", "train")
