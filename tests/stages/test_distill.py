"""distill on a two-layer student over a tiny teacher cache: determinism, learning, resume, outputs, bad input."""
import dataclasses
import functools
import json
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli, cli_subprocess, parse_report_html
from pipeline.artifacts import SUCCESS

FAST = ("--batch-size", "16", "--num-negatives", "5", "--lr", "2e-3", "--shuffle-buffer", "64", "--device", "cpu")


@pytest.fixture
def run(tmp_path, scored_run):
    shutil.copytree(scored_run, tmp_path / "run")
    return tmp_path / "run"


def distill(run, *extra, expect=0):
    return cli("distill", "--run", run, *FAST, *extra, expect=expect)


def metrics(run):
    return [json.loads(l) for l in (run / "distill" / "metrics.jsonl").read_text().splitlines()]


def final_weights(run):
    return load_file(run / "distill" / "final" / "model.safetensors")


def test_first_losses_are_deterministic_and_named(run, tmp_path):
    distill(run, "--max-steps", "3", "--seed", "1")
    other = tmp_path / "other"
    shutil.copytree(run, other)
    distill(other, "--max-steps", "3", "--seed", "1", "--force")
    a, b = metrics(run), metrics(other)
    assert [m["step"] for m in a] == [1, 2, 3]
    for m in a:
        assert set(m) >= {"loss", "itc", "distill", "lr", "logit_scale"}
        assert m["loss"] == pytest.approx(m["itc"] + m["distill"], rel=1e-5)
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    distill(other, "--max-steps", "3", "--seed", "2", "--force")
    assert metrics(other)[0]["loss"] != a[0]["loss"]  # the seed matters (positive choice, shuffling)


LOSS_FLAGS = {"cprd": ("--num-valid", "3"), "kl": ("--teacher-temperature", "2"),
              "partial-hinge": ("--num-valid", "3", "--hinge-margin", "0.5")}


def first_batch(run, batch_size=16, num_negatives=5, seed=0, shuffle_buffer=0, packed=False, outside="drop",
                cluster_size=64, lists="hard", budget=None):
    """(the first batch of epoch 0 as distill builds it, the student): the shuffled stream's first rows (the
    default), or packed in clusters around their negatives; list entries outside the batch dropped or kept."""
    from pipeline.corpus import load_tables
    from pipeline.data import BatchSpec, DistillBatches, Matches, Processors, list_rows
    from pipeline.models import DualEncoder
    from pipeline.packing import plan

    student = json.loads((run / "mine" / "manifest.json").read_text())["config"]["student"]
    enc = DualEncoder(student)
    files = sorted((run / "teacher" / ("easy" if lists == "easy" else "")).glob("part-*.parquet"))
    corpus = load_tables(run / "mine" / "corpus")
    spec = BatchSpec(batch_size=batch_size, num_negatives=num_negatives, seed=seed, shuffle_buffer=shuffle_buffer,
                     outside=outside, outside_budget=budget)
    order = plan(*list_rows(files, Matches(corpus), num_negatives), cluster_size, seed, 0) if packed else None
    batch = next(iter(DistillBatches(spec, files, corpus, Processors(enc.image_processor, enc.tokenizer,
                                                                     enc.max_length), 0, 1, order=order)))
    return batch, enc


def _first_batch_reference(run, loss, include_positive=False, direction=None, shuffle_buffer=0, packed=False,
                           outside="drop", batch_size=16, cluster_size=64, prob=False, lists="hard", budget=None):
    """The first step's distillation term recomputed outside the loop: the first batch (the stream's, shuffle off
    unless asked, or packed) through the untouched student, then the plain-loop reference of the named loss (with
    `direction` "i2t" or "t2i": over that direction's rows only, times their share of the batch; with `prob`, the
    teacher's scores as match probabilities, 1 / (1 + exp(-log-odds)))."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline" / "losses"))
    import reference as ref

    batch, enc = first_batch(run, batch_size, shuffle_buffer=shuffle_buffer, packed=packed, outside=outside,
                             cluster_size=cluster_size, lists=lists, budget=budget)
    with torch.no_grad():
        img = enc.image_features(batch["pixel_values"]).double()
        txt = enc.text_features({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}).double()
        scale = float(enc.model.logit_scale.exp())
    s, s_pos = [], []
    for r in range(len(batch["query"])):
        i2t = bool(batch["query_is_image"][r])
        q = img[batch["query"][r]] if i2t else txt[batch["query"][r]]
        pool = txt if i2t else img
        s.append([scale * float(q @ pool[c]) for c in batch["candidates"][r]])
        s_pos.append(scale * float(q @ pool[batch["positive"][r]]))
    s, s_pos = torch.tensor(s, dtype=torch.float64), torch.tensor(s_pos, dtype=torch.float64)
    t, t_pos, m = batch["teacher"].double(), batch["teacher_positive"].double(), batch["candidate_mask"]
    if prob:
        t, t_pos = 1 / (1 + torch.exp(-t)), 1 / (1 + torch.exp(-t_pos))
    if include_positive:
        s, t = torch.cat([s_pos[:, None], s], 1), torch.cat([t_pos[:, None], t], 1)
        m = torch.cat([torch.ones(len(m), 1, dtype=torch.bool), m], 1)
    share = 1.0
    if direction is not None:
        rows = [r for r in range(len(s)) if bool(batch["query_is_image"][r]) == (direction == "i2t")]
        share = len(rows) / len(s)
        s, t, m, s_pos, t_pos = s[rows], t[rows], m[rows], s_pos[rows], t_pos[rows]
    return share * {"cprd": lambda: ref.cprd_ref(s, t, m, num_valid=3), "listmle": lambda: ref.cprd_ref(s, t, m),
            "kl": lambda: ref.kl_ref(s, t, m, T=2.0), "ranknet": lambda: ref.ranknet_ref(s, t, m),
            "margin-mse": lambda: ref.margin_mse_ref(s_pos, s, t_pos, t, m),
            "hard-negatives": lambda: ref.hard_negatives_ref(s_pos, s, m),
            "cprd-kl/cprd": lambda: ref.cprd_ref(s, t, m, num_valid=3),
            "cprd-kl/kl": lambda: 0.5 * ref.kl_ref(s, t, m, T=2.0), "kl-T2": lambda: ref.kl_ref(s, t, m, T=2.0),
            "kl-T0.1": lambda: ref.kl_ref(s, t, m, T=0.1),
            "partial-ranknet": lambda: ref.partial_pairs_ref(s, t, ref.ranknet_pair, m, 4),
            "partial-hinge": lambda: ref.partial_pairs_ref(s, t, ref.hinge_pair(0.5), m, 3)}[loss]()


@pytest.mark.parametrize("loss", ["cprd", "kl", "listmle", "ranknet", "margin-mse", "hard-negatives", "partial-ranknet",
                                  "partial-hinge", "none"])
def test_every_loss_runs_through_the_loop_as_itself(run, loss):
    # batches of 48 rows, each list cut to the entries that are queries or positives of its own batch
    distill(run, "--loss", loss, *LOSS_FLAGS.get(loss, ()), "--max-steps", "2", "--batch-size", "48",
            "--shuffle-buffer", "0", "--out-of-batch", "drop")
    m = metrics(run)
    assert len(m) == 2 and all(torch.isfinite(torch.tensor(x["loss"])) for x in m)
    assert ("distill" in m[0]) == (loss != "none")
    assert 0 < m[0]["negatives_in_batch"] < m[0]["negatives"]
    if loss != "none":  # the logged term is the named loss on the first batch, not some other one
        want = float(_first_batch_reference(run, loss, batch_size=48))
        assert m[0]["distill"] == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("loss", ["cprd", "kl"])
def test_whole_lists_train_as_before(run, loss):
    distill(run, "--loss", loss, *LOSS_FLAGS[loss], "--max-steps", "2", "--out-of-batch", "encode",
            "--shuffle-buffer", "0")
    m = metrics(run)[0]
    want = float(_first_batch_reference(run, loss, outside="encode"))
    assert m["distill"] == pytest.approx(want, rel=1e-4)
    batch, _ = first_batch(run, outside="encode")
    dropped, _ = first_batch(run)                             # --out-of-batch drop cuts them to the batch
    assert int(dropped["candidate_mask"].sum()) < int(batch["candidate_mask"].sum())
    assert m["images_encoded"] == len(batch["pixel_values"]) and m["texts_encoded"] == len(batch["input_ids"])


def test_the_default_lists_encode_three_outside_items_per_query_and_name_the_budget(run, tmp_path):
    # batches of one query whose 5 listed captions lie outside its pair: a budget of 3, its 3 hardest by teacher
    flags = ("--loss", "kl", "--teacher-temperature", "2", "--max-steps", "1", "--batch-size", "1",
             "--shuffle-buffer", "0")
    distill(run, *flags)
    m = metrics(run)[0]
    budgeted, _ = first_batch(run, 1, outside="encode", budget=3)
    whole, _ = first_batch(run, 1, outside="encode")
    pairs = len(set(budgeted["pair_image"].tolist())) + len(set(budgeted["pair_text"].tolist()))
    encoded = len(budgeted["pixel_values"]) + len(budgeted["input_ids"])
    assert m["images_encoded"] + m["texts_encoded"] == encoded == pairs + 3   # the budget, spent in full
    assert len(whole["pixel_values"]) + len(whole["input_ids"]) > encoded     # so it cut something
    assert int(budgeted["candidate_mask"].sum()) == 3 < int(whole["candidate_mask"].sum()) == m["negatives"]
    listed = whole["teacher"][0, :m["negatives"]].tolist()   # one row: its hardest 3 by the teacher are kept
    assert sorted(budgeted["teacher"][0, :3].tolist()) == sorted(listed)[-3:] != sorted(listed[:3])
    want = float(_first_batch_reference(run, "kl-T2", batch_size=1, outside="encode", budget=3))
    assert m["distill"] == pytest.approx(want, rel=1e-3)      # a small value (one row): float32 against float64
    assert want != pytest.approx(float(_first_batch_reference(run, "kl-T2", batch_size=1, outside="encode")), rel=1e-2)
    identity = lambda out: json.loads((out / "manifest.json").read_text())["identity"]["config"]
    config = identity(run / "distill")
    assert config["out_of_batch_budget"] == 3 and "out_of_batch" not in config
    assert config["out_of_batch_priority"] == "teacher-rank"
    # the same lists however spelled: budget 3, or encode 3 (the earlier spelling), are this output
    for how in ("budget", "encode"):
        again = distill(run, *flags, "--out-of-batch", how, "--out-of-batch-budget", "3")
        assert "[distill] up to date" in again.output
    # the rule before priorities: no priority in the fingerprint, as in the manifests made before them
    distill(run, *flags, "--out-of-batch-priority", "listed", "--out", tmp_path / "listed")
    config = identity(tmp_path / "listed")
    assert config["out_of_batch_budget"] == 3 and "out_of_batch_priority" not in config
    # the whole lists: no budget in the fingerprint, as in every manifest made before budgets
    distill(run, *flags, "--out-of-batch", "encode", "--out", tmp_path / "whole")
    config = identity(tmp_path / "whole")
    assert not {"out_of_batch_budget", "out_of_batch", "out_of_batch_priority"} & set(config)
    # none encodes no list: its outputs made before budgets stay up to date
    distill(run, "--loss", "none", "--max-steps", "1", "--batch-size", "1", "--out", tmp_path / "none")
    config = identity(tmp_path / "none")
    assert not {"out_of_batch_budget", "out_of_batch", "out_of_batch_priority"} & set(config)


@pytest.mark.parametrize("packed", [False, True])
def test_in_batch_lists_encode_the_batchs_pairs_alone_and_count_it(run, packed):
    flags = ("--batching", "packed", "--cluster-size", "8") if packed else ("--shuffle-buffer", "0")
    distill(run, "--loss", "kl", "--teacher-temperature", "2", "--max-steps", "3", "--batch-size", "48",
            "--out-of-batch", "drop", *flags)
    batch, _ = first_batch(run, 48, packed=packed, cluster_size=8)
    m = metrics(run)
    # every image and caption of a batch with in-batch lists is a query or a positive of it
    pairs_i, pairs_t = set(batch["pair_image"].tolist()), set(batch["pair_text"].tolist())
    assert pairs_i == set(range(len(batch["pixel_values"]))) and pairs_t == set(range(len(batch["input_ids"])))
    assert m[0]["images_encoded"] == len(pairs_i) and m[0]["texts_encoded"] == len(pairs_t)
    assert int(batch["candidate_mask"].sum()) == m[0]["negatives_in_batch"]
    for x in m:
        assert x["in_batch_share"] == pytest.approx(x["negatives_in_batch"] / x["negatives"])
    assert m[0]["distill"] == pytest.approx(float(_first_batch_reference(run, "kl-T2", packed=packed, batch_size=48,
                                                                        cluster_size=8)), rel=1e-4)
    config = json.loads((run / "distill" / "manifest.json").read_text())["identity"]["config"]
    assert config["out_of_batch"] == "drop"                   # not the default: in the fingerprint
    assert (config.get("batching"), config.get("cluster_size")) == (("packed", 8) if packed else (None, None))


def test_a_loss_of_two_terms_logs_each_and_trains_on_their_sum(run):
    distill(run, "--loss", "cprd-kl", "--num-valid", "3", "--teacher-temperature", "2", "--kl-weight", "0.5",
            "--max-steps", "1", "--shuffle-buffer", "0", "--out-of-batch", "encode")
    m = metrics(run)[0]
    for term in ("cprd", "kl"):
        want = float(_first_batch_reference(run, f"cprd-kl/{term}", outside="encode"))
        assert m[f"distill/{term}"] == pytest.approx(want, rel=1e-4)
    assert m["distill"] == pytest.approx(m["distill/cprd"] + m["distill/kl"], rel=1e-6)
    assert m["loss"] == pytest.approx(m["itc"] + m["distill"], rel=1e-6)


def test_include_positive_reaches_the_loss(run):
    distill(run, "--loss", "cprd", "--num-valid", "3", "--include-positive", "--max-steps", "1",
            "--shuffle-buffer", "0", "--out-of-batch", "encode")
    want = float(_first_batch_reference(run, "cprd", include_positive=True, outside="encode"))
    assert metrics(run)[0]["distill"] == pytest.approx(want, rel=1e-4)
    assert want != pytest.approx(float(_first_batch_reference(run, "cprd", outside="encode")), rel=1e-3)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_distill_directions_teaches_one_directions_rows_at_their_share(run, direction):
    # shuffled, so that the first batch holds both directions (the teacher's shards list them one after the
    # other); the whole lists, so that every row has negatives to rank
    distill(run, "--loss", "cprd", "--num-valid", "3", "--distill-directions", direction, "--max-steps", "1",
            "--out-of-batch", "encode")
    ref = functools.partial(_first_batch_reference, run, "cprd", outside="encode", shuffle_buffer=64)
    want, other = float(ref(direction=direction)), float(ref(direction={"i2t": "t2i", "t2i": "i2t"}[direction]))
    assert metrics(run)[0]["distill"] == pytest.approx(want, rel=1e-4)
    assert 0 < want and 0 < other  # each direction has rows in this batch
    assert want + other == pytest.approx(float(ref()), rel=1e-6)  # every row has a valid negative here
    manifest = json.loads((run / "distill" / "manifest.json").read_text())
    assert manifest["identity"]["config"]["distill_directions"] == direction


def test_only_the_chosen_losses_options_enter_the_fingerprint(run, tmp_path):
    distill(run, "--loss", "cprd", "--max-steps", "1")
    manifest = json.loads((run / "distill" / "manifest.json").read_text())
    assert manifest["identity"]["config"]["loss_options"] == {"num_valid": 4, "min_teacher_score": None,
                                                              "include_positive": False, "student_temperature": 1.0}
    line = _error(distill(run, "--loss", "cprd", "--teacher-temperature", "3", "--max-steps", "1", expect=None))
    assert "--teacher-temperature is an option of cprd-kl / kl, not of --loss cprd" in line


def test_teacher_scale_prob_gives_the_loss_match_probabilities_and_enters_the_fingerprint(run, tmp_path):
    flags = ("--loss", "kl", "--teacher-temperature", "0.1", "--max-steps", "1", "--batch-size", "48",
             "--shuffle-buffer", "0", "--out-of-batch", "drop")
    distill(run, *flags)
    logodds = metrics(run)[0]["distill"]
    assert "teacher_scale" not in json.loads((run / "distill" / "manifest.json").read_text())["identity"]["config"]
    distill(run, *flags, "--teacher-scale", "prob", "--out", tmp_path / "prob")
    made = json.loads((tmp_path / "prob" / "manifest.json").read_text())
    assert made["identity"]["config"]["teacher_scale"] == "prob"
    got = json.loads((tmp_path / "prob" / "metrics.jsonl").read_text().splitlines()[0])["distill"]
    assert got == pytest.approx(float(_first_batch_reference(run, "kl-T0.1", batch_size=48, prob=True)), rel=1e-4)
    assert logodds == pytest.approx(float(_first_batch_reference(run, "kl-T0.1", batch_size=48)), rel=1e-4)
    assert got != pytest.approx(logodds, rel=1e-2)


def test_teacher_scale_prob_is_refused_for_an_itm_itc_cache(run, tiny_blip, tmp_path):
    other = tmp_path / "teacher-itc"
    cli("score-teacher", "--run", run, "--teacher", tiny_blip, "--images-per-shard", "8", "--score", "itm+itc",
        "--out", other)
    line = _error(distill(run, "--max-steps", "1", "--scores", other, "--teacher-scale", "prob",
                          "--out", tmp_path / "s", expect=None))
    assert line.startswith("error: --teacher-scale prob: ") and str(other) in line and "--score itm+itc" in line
    assert not (tmp_path / "s").exists()


def _mine_easy(run, easy="6"):
    """The run mined again with --easy (its embeddings re-used) and scored again (its input changed)."""
    mined = json.loads((run / "mine" / "manifest.json").read_text())
    cli("mine", "--run", run, "--data", mined["locations"]["data"], "--student", mined["locations"]["student"],
        *[str(x) for kv in (("--k", mined["config"]["k"]), ("--shard-size", mined["config"]["shard_size"]))
          for x in kv], "--easy", easy, "--force")
    teacher = json.loads((run / "teacher" / "manifest.json").read_text())
    cli("score-teacher", "--run", run, "--teacher", teacher["locations"]["teacher"], "--images-per-shard", "8")


def test_list_easy_runs_the_loss_over_the_easy_lists(run):
    _mine_easy(run)
    distill(run, "--list", "easy", "--num-valid", "3", "--max-steps", "1", "--batch-size", "48", "--shuffle-buffer",
            "0", "--out-of-batch", "encode")
    made = json.loads((run / "distill" / "manifest.json").read_text())
    assert made["identity"]["config"]["list"] == "easy"
    got = metrics(run)[0]["distill"]
    want = float(_first_batch_reference(run, "cprd", batch_size=48, outside="encode", lists="easy"))
    assert got == pytest.approx(want, rel=1e-4)
    hard = float(_first_batch_reference(run, "cprd", batch_size=48, outside="encode"))
    assert got != pytest.approx(hard, rel=1e-3)                      # not the hard lists


def test_list_easy_needs_easy_candidates_as_long_as_the_lists(run, tmp_path):
    line = _error(distill(run, "--list", "easy", "--max-steps", "1", expect=None))
    assert line.startswith("error: --list easy: ") and str(run / "mine") in line and "mine --easy K" in line
    _mine_easy(run, easy="3")
    line = _error(distill(run, "--list", "easy", "--max-steps", "1", expect=None))
    assert "--num-negatives 5 is more than the 3 easy candidates per query" in line
    assert not (run / "distill" / "final").exists()


def test_false_negative_counts_are_logged(run):
    distill(run, "--max-steps", "2", "--max-teacher-margin", "0")
    m = metrics(run)
    assert all(x["false_negatives"] == 0 for x in m)  # the test corpus has unique captions and files
    assert sum(x["dropped_by_margin"] for x in m) > 0


def test_loss_decreases(run):
    distill(run, "--loss", "cprd", "--epochs", "8", "--lr", "3e-3")
    m = metrics(run)
    assert len(m) == 8 * (144 // 16)
    first, last = sum(x["loss"] for x in m[:5]) / 5, sum(x["loss"] for x in m[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    assert sum(x["distill"] for x in m[-5:]) < sum(x["distill"] for x in m[:5])


@pytest.mark.parametrize("lists", [("--out-of-batch-budget", "6"), ("--out-of-batch", "encode")],
                         ids=["budget", "whole-lists"])
def test_killed_run_resumes_to_the_same_weights(run, tmp_path, lists):
    ref = tmp_path / "ref"
    shutil.copytree(run, ref)
    args = ("--max-steps", "10", "--save-every", "4", "--grad-accum", "2", *lists)
    distill(ref, *args)
    proc = cli_subprocess("distill", "--run", run, *FAST, *args, env={"CPRD_FAULT": "step:6"})
    assert proc.returncode == -signal.SIGKILL and not (run / "distill" / SUCCESS).exists()
    assert json.loads((run / "distill" / "checkpoints" / "latest.json").read_text())["step"] == 4
    out = distill(run, *args).output
    assert "resuming from step-4: step 4, epoch 1, batch 0" in out
    assert [m["step"] for m in metrics(run)] == list(range(1, 11))
    a, b = final_weights(run), final_weights(ref)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert [m["loss"] for m in metrics(run)] == pytest.approx([m["loss"] for m in metrics(ref)], rel=1e-5)


def test_final_loads_with_automodel_and_rerun_is_up_to_date(run):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
    distill(run, "--max-steps", "2")
    final = run / "distill" / "final"
    model = AutoModel.from_pretrained(final)
    assert type(model).__name__ == "CLIPModel"
    AutoTokenizer.from_pretrained(final), AutoImageProcessor.from_pretrained(final)
    assert "up to date" in distill(run, "--max-steps", "2").output
    manifest = json.loads((run / "distill" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "final/model.safetensors" in manifest["shards"]


def test_epoch_boundary_and_two_workers_match_zero_workers(run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    distill(run, "--epochs", "2")
    cli("distill", "--run", other, *FAST, "--epochs", "2", "--num-workers", "2")
    assert [m["loss"] for m in metrics(run)] == pytest.approx([m["loss"] for m in metrics(other)], rel=1e-6)
    assert {m["epoch"] for m in metrics(run)} == {0, 1}


# ------------------------------------------------------------------ bad input
def _error(result):
    assert result.exit_code == 2, result.output
    return result.output.strip().splitlines()[-1]


def test_unknown_loss(run):
    assert "'hinge' is not one of" in distill(run, "--loss", "hinge", expect=None).output


@pytest.mark.parametrize("flags,message", [(("--max-steps", "0"), "--max-steps: must be >= 1, got 0"),
                                           (("--epochs", "0"), "--epochs: must be >= 1, got 0"),
                                           (("--max-steps", "-5"), "--max-steps: must be >= 1, got -5"),
                                           (("--lr", "-1"), "--lr: must be > 0, got -1.0"),
                                           (("--batch-size", "0"), "--batch-size: must be >= 1, got 0"),
                                           (("--num-valid", "-1"), "--num-valid: must be >= 1"),
                                           (("--tie-margin", "0"), "--tie-margin: must be > 0, got 0.0"),
                                           (("--reduction", "max"), "'--reduction': 'max' is not one of 'mean', 'sum'"),
                                           (("--loss", "listmle", "--reduction", "sum"),
                                            "--reduction is an option of cprd / cprd-kl / partial-hinge / "
                                            "partial-ranknet, not of --loss listmle"),
                                           (("--loss", "cprd-kl", "--kl-weight", "-1"),
                                            "--kl-weight: must be >= 0, got -1.0"),
                                           (("--student-temperature", "0"), "--student-temperature: must be > 0"),
                                           (("--out-of-batch", "encode", "--out-of-batch-budget", "0"),
                                            "--out-of-batch-budget: must be >= 1, got 0"),
                                           (("--out-of-batch", "drop", "--out-of-batch-budget", "8"),
                                            "drop encodes none of those entries (got --out-of-batch-budget 8)"),
                                           (("--cluster-size", "8"), "--cluster-size sizes the clusters of "
                                                                     "--batching packed"),
                                           (("--batching", "packed", "--cluster-size", "0"),
                                            "--cluster-size: must be >= 1, got 0"),
                                           (("--frozen-negatives", "--out-of-batch", "drop"),
                                            "with --out-of-batch drop there are none"),
                                           (("--outside-grad-layers", "-1"), "--outside-grad-layers: must be >= 0"),
                                           (("--outside-grad-layers", "1", "--frozen-negatives"),
                                            "it cannot go with --frozen-negatives"),
                                           (("--outside-grad-layers", "1", "--out-of-batch", "drop"),
                                            "it cannot go with --out-of-batch drop")])
def test_out_of_range_values_are_refused_before_anything_is_written(run, flags, message):
    assert message in _error(distill(run, *flags, expect=None))
    assert not (run / "distill").exists()


def test_too_many_negatives(run):
    line = _error(distill(run, "--num-negatives", "7", expect=None))
    assert "--num-negatives 7 is more than the 6 hard negatives per query" in line
    assert not (run / "distill").exists()


def test_teacher_from_a_different_corpus(run, tiny_clip, tmp_path):
    from conftest import write_albef_corpus
    other = write_albef_corpus(tmp_path / "other-data", n_images=20)
    cli("mine", "--run", run, "--data", other, "--student", tiny_clip, "--k", "6", "--force")
    line = _error(distill(run, "--max-steps", "1", expect=None))
    assert "scored on a different corpus or mining run" in line and "rerun score-teacher" in line


def test_teacher_missing(run):
    shutil.rmtree(run / "teacher")
    assert "no score-teacher output here" in _error(distill(run, expect=None))


def test_changed_settings_never_discard_checkpoints(run):
    proc = cli_subprocess("distill", "--run", run, *FAST, "--max-steps", "4", "--save-every", "2",
                          env={"CPRD_FAULT": "step:3"})
    assert proc.returncode == -signal.SIGKILL
    line = _error(distill(run, "--max-steps", "4", "--lr", "1e-4", expect=None))
    assert "made with different settings" in line and "lr" in line
    assert (run / "distill" / "checkpoints" / "latest.json").exists()


def test_a_non_finite_loss_stops_training_naming_the_step(run, monkeypatch):
    from pipeline.losses import registry

    spec = registry.get("cprd")
    calls = []

    def poisoned(x, o):
        calls.append(1)
        value = spec.fn(x, o)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(registry, "get", lambda name: dataclasses.replace(spec, fn=poisoned))
    line = _error(distill(run, "--max-steps", "5", expect=None))
    assert line.startswith("error: non-finite loss at step 3 (itc=") and "distill=nan" in line
    assert not (run / "distill" / SUCCESS).exists()


def test_a_damaged_checkpoint_is_refused_naming_the_file(run):
    args = ("--max-steps", "4", "--save-every", "2")
    proc = cli_subprocess("distill", "--run", run, *FAST, *args, env={"CPRD_FAULT": "step:3"})
    assert proc.returncode == -signal.SIGKILL
    weights = run / "distill" / "checkpoints" / "step-2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:-56] = bytes(8)                                        # 8 bytes of a tensor zeroed
    weights.write_bytes(bytes(data))
    result = distill(run, *args, expect=2)
    assert f"{weights}: damaged" in result.output and not (run / "distill" / SUCCESS).exists()


def test_sigterm_saves_a_checkpoint_and_the_resume_ends_as_an_uninterrupted_run(run, tmp_path):
    import subprocess
    import sys
    import time

    from conftest import REPO

    ref = tmp_path / "ref"
    shutil.copytree(run, ref)
    args = ("--max-steps", "40", "--batch-size", "4", "--save-every", "1000")
    distill(ref, *args)
    proc = subprocess.Popen([sys.executable, "-m", "cprd_pipeline", "distill", "--run", str(run), *FAST, *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "distill" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    steps = len(metrics(run))
    assert 3 <= steps < 40 and "SIGTERM: saved a checkpoint at step" in err
    assert json.loads((run / "distill" / "checkpoints" / "latest.json").read_text())["step"] == steps
    distill(run, *args)
    a, b = final_weights(run), final_weights(ref)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_a_resume_at_the_last_step_writes_the_same_final_folder(run, tmp_path):
    ref = tmp_path / "ref"
    shutil.copytree(run, ref)
    args = ("--max-steps", "3")
    distill(ref, *args)
    proc = cli_subprocess("distill", "--run", run, *FAST, *args, env={"CPRD_FAULT": "step:3"})  # after its checkpoint
    assert proc.returncode == -signal.SIGKILL and not (run / "distill" / "final").exists()
    with open(run / "distill" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')                                 # a torn line, as a kill mid-write leaves
    distill(run, *args)
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]
    final, want = run / "distill" / "final", ref / "distill" / "final"
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "preprocessor_config.json"):
        assert (final / name).read_text() == (want / name).read_text(), name


def test_a_finished_run_is_extended_from_its_last_checkpoint_not_retrained(run):
    import math

    distill(run, "--max-steps", "4", "--save-every", "2")
    first = (run / "distill" / "metrics.jsonl").read_text()
    before = final_weights(run)
    fp4 = json.loads((run / "distill" / "manifest.json").read_text())["fingerprint"]
    out = distill(run, "--max-steps", "7", "--save-every", "2").output
    assert "extending: 4 steps trained, continuing to 7 from its last checkpoint" in out
    assert "resuming from step-4: step 4" in out
    rows = metrics(run)
    assert (run / "distill" / "metrics.jsonl").read_text().startswith(first)      # steps 1-4 kept as they were
    assert [m["step"] for m in rows] == list(range(1, 8))
    # steps 5-7 follow the cosine of the new length (lr 2e-3, no warm-up), computed here from its formula
    assert [m["lr"] for m in rows[4:]] == pytest.approx([2e-3 * 0.5 * (1 + math.cos(math.pi * k / 7))
                                                          for k in (5, 6, 7)], rel=1e-9)
    manifest = json.loads((run / "distill" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["steps"] == 7 and (run / "distill" / SUCCESS).exists()
    assert manifest["extended"] == [{"fingerprint": fp4, "steps": 4}]
    assert manifest["identity"]["config"]["max_steps"] == 7
    after = final_weights(run)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert "after 7 optimizer steps" in (run / "distill" / "final" / "README.md").read_text()
    assert "up to date" in distill(run, "--max-steps", "7", "--save-every", "2").output
    # by epochs too: one epoch of this cache is 9 steps (144 rows / 16), so it continues to step 9, in epoch 0
    out = distill(run, "--epochs", "1", "--save-every", "2").output
    assert "extending: 7 steps trained, continuing to 9" in out
    assert [(m["step"], m["epoch"]) for m in metrics(run)][-3:] == [(7, 0), (8, 0), (9, 0)]


def test_a_run_is_not_shortened_and_other_changes_still_need_force(run):
    distill(run, "--max-steps", "4")
    line = _error(distill(run, "--max-steps", "2", expect=2))
    assert "has trained 4 steps" in line and "extended, not shortened" in line and "--force" in line
    line = _error(distill(run, "--max-steps", "6", "--lr", "1e-3", expect=2))
    assert "made with different settings" in line and "lr" in line
    # nothing was touched: still complete, final/ intact
    assert (run / "distill" / SUCCESS).exists() and (run / "distill" / "final" / "model.safetensors").exists()
    assert "up to date" in distill(run, "--max-steps", "4").output


def test_status_shows_training_progress_and_staleness_down_the_chain(run):
    proc = cli_subprocess("distill", "--run", run, *FAST, "--max-steps", "4", "--save-every", "2",
                          env={"CPRD_FAULT": "step:3"})
    assert proc.returncode == -signal.SIGKILL
    lines = {l.split()[0]: l for l in cli("status", "--run", run).output.splitlines()}
    assert "training: checkpoint at step 2, logged to step 3" in lines["distill"]
    distill(run, "--max-steps", "4", "--save-every", "2")
    manifest = json.loads((run / "mine" / "manifest.json").read_text())
    (run / "mine" / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": "0" * 64}))  # mine redone
    lines = {l.split()[0]: l for l in cli("status", "--run", run).output.splitlines()}
    assert "stale: mine changed" in lines["score-teacher"]
    assert "stale: score-teacher is stale" in lines["distill"]


def test_force_loads_the_new_student_before_it_deletes_anything(run, tiny_blip):
    distill(run, "--max-steps", "1")
    before = final_weights(run)
    result = distill(run, "--max-steps", "1", "--force", "--student", tiny_blip, expect=2)
    assert "it is not a trained dual encoder" in result.output or "has no get_image_features" in result.output
    assert (run / "distill" / SUCCESS).exists()                      # the finished student is still there
    after = final_weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_batch_without_the_taught_direction_still_logs_every_named_term():
    from pipeline.losses import registry
    from stages.distill import compute_loss
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    batch = {"pair_image": torch.arange(3), "pair_text": torch.arange(3), "pair_positive_mask": torch.eye(3).bool(),
             "query_is_image": torch.ones(2, dtype=torch.bool),       # both rows are image queries
             "query": torch.tensor([0, 1]), "positive": torch.tensor([0, 1]),
             "candidates": torch.tensor([[1, 2], [0, 2]]), "candidate_mask": torch.ones(2, 2, dtype=torch.bool),
             "teacher": torch.randn(2, 2, generator=g), "teacher_positive": torch.randn(2, generator=g)}
    spec = registry.get("cprd-kl")
    both = compute_loss(spec, spec.options(num_valid=2), 1.0, img, txt, torch.tensor(10.0), batch)
    none = compute_loss(spec, spec.options(num_valid=2), 1.0, img, txt, torch.tensor(10.0), batch, directions="t2i")
    assert set(none) == set(both) == {"itc", "distill", "distill/cprd", "distill/kl", "loss"}
    assert float(none["distill"]) == 0.0 and float(none["distill/kl"]) == 0.0 and float(both["distill/kl"]) > 0
    assert float(none["loss"]) == pytest.approx(float(none["itc"]))


def _towers_and_inputs(tiny_clip):
    from pipeline.models import DualEncoder
    from stages.distill import StudentTowers

    enc = DualEncoder(str(tiny_clip))
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(7, 3, 32, 32, generator=g)
    tokens = enc.tokenize(["a red circle", "two blue squares left of a star", "a star", "green", "a red circle",
                           "one small yellow triangle"])
    return StudentTowers(enc).eval(), pixels, tokens["input_ids"], tokens["attention_mask"]


@pytest.mark.parametrize("others", [True, False])
def test_frozen_negatives_encode_the_same_features_and_pass_gradient_through_live_rows_only(tiny_clip, others):
    towers, pixels, ids, mask = _towers_and_inputs(tiny_clip)
    live_img = torch.tensor([True, False, True, False, False, True, False])
    live_txt = torch.tensor([False, True, True, False, True, False])
    w_img, w_txt = torch.randn(7, 1), torch.randn(6, 1)   # a loss reading every row, each with its own weight

    def grads(img, txt, scale):
        towers.zero_grad()
        ((img * w_img).sum() + (txt * w_txt).sum() + scale).backward()
        return {n: p.grad.clone() for n, p in towers.named_parameters() if p.grad is not None}

    # reference: every row encoded in one batch with gradient, then the non-live rows cut off the graph
    img, txt, scale, _ = towers(pixels, ids, mask)
    ref_img = torch.where(live_img[:, None], img, img.detach() if others else torch.zeros_like(img))
    ref_txt = torch.where(live_txt[:, None], txt, txt.detach() if others else torch.zeros_like(txt))
    want = grads(ref_img, ref_txt, scale)
    got_img, got_txt, got_scale, _ = towers(pixels, ids, mask, live_images=live_img, live_texts=live_txt, others=others)
    torch.testing.assert_close(got_img, ref_img.detach(), atol=1e-5, rtol=1e-5)   # other batch sizes: last bits
    torch.testing.assert_close(got_txt, ref_txt.detach(), atol=1e-5, rtol=1e-5)
    if not others:
        assert not got_img[~live_img].any() and not got_txt[~live_txt].any()
    got = grads(got_img, got_txt, got_scale)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    # and the cut matters: with every row live the image tower's gradient differs
    img, txt, scale, _ = towers(pixels, ids, mask)
    everything = grads(img, txt, scale)
    assert any(not torch.allclose(everything[n], want[n], atol=1e-5) for n in want if "vision" in n)


def _cut_below(blocks, n):
    """Hooks that detach what enters the last n blocks (n = 0: what leaves the last): the same features, gradient
    through the top of the tower only. Independent of distill's grad-mode switch; handles to remove."""
    def pre(module, args, kwargs):
        if args:
            return (args[0].detach(), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}

    def post(module, args, output):
        return (output[0].detach(), *output[1:]) if isinstance(output, tuple) else output.detach()

    n = min(n, len(blocks))
    return [blocks[-n].register_forward_pre_hook(pre, with_kwargs=True) if n else
            blocks[-1].register_forward_hook(post)]


@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_outside_grad_layers_move_the_top_blocks_alone_through_the_other_rows(tiny_clip, n):
    towers, pixels, ids, mask = _towers_and_inputs(tiny_clip)
    enc = towers._encoder[0]
    blocks = enc.tower_layers()
    assert [len(b) for b in blocks] == [2, 2]   # n = 5 is then every block
    live_img = torch.tensor([True, False, True, False, False, True, False])
    live_txt = torch.tensor([False, True, True, False, True, False])
    w_img, w_txt = torch.randn(7, 1), torch.randn(6, 1)

    def grads(img, txt, scale):
        towers.zero_grad()
        ((img * w_img).sum() + (txt * w_txt).sum() + scale).backward()
        return {name: p.grad.clone() for name, p in towers.named_parameters() if p.grad is not None}

    # reference: every row with its whole graph, and every row again through hooks that detach below the cut
    img, txt, scale, _ = towers(pixels, ids, mask)
    handles = [h for b in blocks for h in _cut_below(b, n)]
    cut_img, cut_txt, _, _ = towers(pixels, ids, mask)
    for h in handles:
        h.remove()
    want = grads(torch.where(live_img[:, None], img, cut_img), torch.where(live_txt[:, None], txt, cut_txt), scale)
    got_img, got_txt, got_scale, _ = towers(pixels, ids, mask, live_images=live_img, live_texts=live_txt,
                                            others=True, others_grad_layers=n)
    assert torch.is_grad_enabled()   # the switch inside the tower is undone
    torch.testing.assert_close(got_img, img.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_txt, txt.detach(), atol=1e-5, rtol=1e-5)
    got = grads(got_img, got_txt, got_scale)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    # and the cut is where it is said to be: the top differs from frozen rows, the bottom from whole rows
    frozen = grads(*towers(pixels, ids, mask, live_images=live_img, live_texts=live_txt, others=True)[:3])
    everything = grads(*towers(pixels, ids, mask)[:3])
    differs = lambda a, key: not torch.allclose(a[key], got[key], atol=1e-6)
    assert differs(frozen, "model.visual_projection.weight")
    assert differs(frozen, "model.vision_model.encoder.layers.1.mlp.fc1.weight") == (n >= 1)
    assert differs(everything, "model.vision_model.encoder.layers.0.mlp.fc1.weight") == (n < 2)
    assert differs(everything, "model.vision_model.embeddings.patch_embedding.weight")


def test_a_forward_with_no_live_row_encodes_the_others_alone(tiny_clip):
    towers, pixels, ids, mask = _towers_and_inputs(tiny_clip)
    img, txt, _, _ = towers(pixels, ids, mask)
    no_image, no_text = torch.zeros(7, dtype=torch.bool), torch.zeros(6, dtype=torch.bool)
    got_img, got_txt, _, _ = towers(pixels, ids, mask, live_images=no_image, live_texts=no_text, others=True,
                                    others_grad_layers=1)
    torch.testing.assert_close(got_img, img.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_txt, txt.detach(), atol=1e-5, rtol=1e-5)
    assert got_img.requires_grad   # through the last block
    frozen_img = towers(pixels, ids, mask, live_images=no_image, live_texts=no_text, others=True)[0]
    assert not frozen_img.requires_grad
    with pytest.raises(ValueError, match="nothing to encode"):
        towers(pixels, ids, mask, live_images=no_image, live_texts=no_text, others=False)


def test_outside_grad_layers_train_on_the_same_loss_with_another_gradient(run, tmp_path):
    distill(run, "--loss", "cprd", "--num-valid", "3", "--max-steps", "2", "--shuffle-buffer", "0")
    top = tmp_path / "top"
    shutil.copytree(run, top)
    distill(top, "--loss", "cprd", "--num-valid", "3", "--max-steps", "2", "--shuffle-buffer", "0",
            "--outside-grad-layers", "1", "--force")
    a, b = metrics(run), metrics(top)
    assert b[0]["distill"] == pytest.approx(a[0]["distill"], rel=1e-5)   # the same features at the first step
    assert b[0]["images_encoded"] == a[0]["images_encoded"]
    wa, wb = final_weights(run), final_weights(top)
    assert any(not torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa if "vision" in k)
    identity = lambda r: json.loads((r / "distill" / "manifest.json").read_text())["identity"]["config"]
    assert identity(top)["outside_grad_layers"] == 1
    assert "outside_grad_layers" not in identity(run)   # outputs made before the option stay up to date


@pytest.mark.parametrize("option", [("--outside-grad-layers", "1"), ("--grad-checkpointing",)])
def test_a_student_without_blocks_to_cut_is_refused_before_training(run, monkeypatch, option):
    from pipeline.errors import PipelineError
    from pipeline.models import DualEncoder

    def no_blocks(self, needed_by="--outside-grad-layers"):
        raise PipelineError(f"{self.name}: CLIPModel has no vision_model.encoder.layers; {needed_by} needs them")

    monkeypatch.setattr(DualEncoder, "tower_layers", no_blocks)
    result = distill(run, "--loss", "kl", *option, "--max-steps", "1", expect=None)
    assert f"has no vision_model.encoder.layers; {option[0]} needs them" in _error(result)
    assert not (run / "distill" / "metrics.jsonl").exists()


def test_tower_layers_name_the_option_that_needs_them(tiny_clip):
    from pipeline.errors import PipelineError
    from pipeline.models import DualEncoder

    enc = DualEncoder(str(tiny_clip))
    enc.model.vision_model.encoder.layers = torch.nn.ModuleList()
    with pytest.raises(PipelineError, match="has no vision_model.encoder.layers .*; --grad-checkpointing needs"):
        enc.tower_layers("--grad-checkpointing")


class _Saved:
    """Bytes of the tensors autograd keeps for the backward, counted as they are saved (a checkpointed block
    keeps its own under its own hooks, so they are not counted: what the checkpoint frees)."""

    def __enter__(self):
        self.bytes = 0

        def pack(t):
            self.bytes += t.numel() * t.element_size()
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


@pytest.mark.parametrize("live", ["every row", "frozen others", "others through the last block"])
def test_grad_checkpointing_recomputes_the_blocks_for_the_same_features_and_gradients(tiny_clip, live):
    from pipeline.models import DualEncoder
    from stages.distill import StudentTowers

    reference, pixels, ids, mask = _towers_and_inputs(tiny_clip)
    enc = DualEncoder(str(tiny_clip))
    runs = {}   # block forward calls, counted inside the checkpoint: it reruns forward itself in the backward
    for i, block in enumerate(b for blocks in enc.tower_layers() for b in blocks):
        def counted(*args, _forward=block.forward, _i=i, **kwargs):
            runs[_i] = runs.get(_i, 0) + 1
            return _forward(*args, **kwargs)
        block.forward = counted
    towers = StudentTowers(enc, grad_checkpointing=True).eval()
    wrapped = [b.forward for blocks in enc.tower_layers() for b in blocks]
    StudentTowers(enc, grad_checkpointing=True)   # towers built again over the same blocks do not wrap them twice
    assert [b.forward for blocks in enc.tower_layers() for b in blocks] == wrapped
    kwargs = {}
    if live != "every row":
        kwargs = {"live_images": torch.tensor([True, False, True, False, False, True, False]),
                  "live_texts": torch.tensor([False, True, True, False, True, False]), "others": True,
                  "others_grad_layers": 1 if live == "others through the last block" else None}
    w_img, w_txt = torch.randn(7, 1), torch.randn(6, 1)

    def step(model):
        model.zero_grad()
        with _Saved() as saved:
            img, txt, scale, _ = model(pixels, ids, mask, **kwargs)
        ((img * w_img).sum() + (txt * w_txt).sum() + scale).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return img.detach(), txt.detach(), grads, saved.bytes

    want_img, want_txt, want, plain_bytes = step(reference)
    runs.clear()
    got_img, got_txt, got, checkpointed_bytes = step(towers)
    torch.testing.assert_close(got_img, want_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_txt, want_txt, atol=1e-5, rtol=1e-5)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    # blocks 0, 1: the image tower's, 2, 3: the text tower's. A block run with gradient runs twice (the forward,
    # then again in the backward); without it (the rows that are not live, below the cut) once
    want_runs = {"every row": [2, 2, 2, 2], "frozen others": [3, 3, 3, 3],
                 "others through the last block": [3, 4, 3, 4]}[live]
    assert [runs[i] for i in range(4)] == want_runs
    assert checkpointed_bytes < plain_bytes / 2
    # without gradient (validation) the blocks run once and nothing is kept
    runs.clear()
    with torch.no_grad():
        towers(pixels, ids, mask)
    assert runs == {0: 1, 1: 1, 2: 1, 3: 1}


def test_grad_checkpointing_trains_the_same_student_and_is_no_part_of_its_identity(run, tmp_path):
    distill(run, "--loss", "cprd-kl", "--num-valid", "3", "--max-steps", "3", "--shuffle-buffer", "0")
    recomputed = tmp_path / "recomputed"
    shutil.copytree(run, recomputed)
    result = distill(recomputed, "--loss", "cprd-kl", "--num-valid", "3", "--max-steps", "3", "--shuffle-buffer",
                     "0", "--grad-checkpointing", "--force")
    assert "grad_checkpointing: true" in result.output   # the resolved config, printed
    a, b = metrics(run), metrics(recomputed)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x["images_encoded"] == y["images_encoded"]
        for key in ("loss", "itc", "distill"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), key
    wa, wb = final_weights(run), final_weights(recomputed)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4, msg=k)
    manifest = lambda r: json.loads((r / "distill" / "manifest.json").read_text())
    assert manifest(recomputed)["config"]["grad_checkpointing"] is True
    assert manifest(recomputed)["identity"] == manifest(run)["identity"]   # a memory setting, not another student
    assert "up to date" in distill(run, "--loss", "cprd-kl", "--num-valid", "3", "--max-steps", "3",
                                      "--shuffle-buffer", "0", "--grad-checkpointing").output


def test_out_of_gpu_memory_says_what_to_add_and_a_rerun_with_it_goes_on_from_the_last_checkpoint(run, tmp_path,
                                                                                                     monkeypatch):
    from stages.distill import Training

    args = ("--loss", "kl", "--max-steps", "4", "--shuffle-buffer", "0", "--save-every", "1")
    whole = tmp_path / "whole"
    shutil.copytree(run, whole)
    distill(whole, *args)
    step, calls = Training.step, []

    def runs_out_at_the_third(self, towers, batch):
        calls.append(1)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return step(self, towers, batch)

    monkeypatch.setattr(Training, "step", runs_out_at_the_third)
    line = _error(distill(run, *args, expect=None))
    assert line.startswith("error: out of GPU memory at step 3, on a micro-batch of "), line
    assert "rerun with --grad-checkpointing" in line and "it goes on from its checkpoint of step 2" in line, line
    assert "--out-of-batch-budget and rerun with --force (a new run)" in line, line
    assert len(metrics(run)) == 2 and not (run / "distill" / "final").exists()
    monkeypatch.setattr(Training, "step", step)
    again = distill(run, *args, "--grad-checkpointing")
    assert "resuming from" in again.output and "step 2" in again.output
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    for x, y in zip(metrics(whole), metrics(run)):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), y["step"]
    wa, wb = final_weights(whole), final_weights(run)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_out_of_gpu_memory_at_the_first_step(run, monkeypatch, checkpointing):
    from stages.distill import Training

    def out_of_memory(self, towers, batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(Training, "step", out_of_memory)
    flag = ("--grad-checkpointing",) if checkpointing else ()
    line = _error(distill(run, "--loss", "kl", "--max-steps", "2", *flag, expect=None))
    assert "out of GPU memory at step 1" in line and "lower --batch-size or --out-of-batch-budget" in line, line
    assert "and rerun with --force (a new run)" in line, line
    if checkpointing:   # nothing left to add: smaller batches only
        assert "--grad-checkpointing" not in line, line
    else:
        assert "rerun with --grad-checkpointing" in line and "goes on from the start (no checkpoint yet)" in line


def test_frozen_negatives_train_on_the_same_loss_with_another_gradient(run, tmp_path):
    distill(run, "--loss", "cprd", "--num-valid", "3", "--max-steps", "2", "--out-of-batch", "encode",
            "--shuffle-buffer", "0")
    frozen = tmp_path / "frozen"
    shutil.copytree(run, frozen)
    distill(frozen, "--loss", "cprd", "--num-valid", "3", "--max-steps", "2", "--out-of-batch", "encode",
            "--shuffle-buffer", "0", "--frozen-negatives", "--force")
    a, b = metrics(run), metrics(frozen)
    # the first step's loss is the same function of the same features; the update after it is not
    assert b[0]["distill"] == pytest.approx(float(_first_batch_reference(run, "cprd", outside="encode")), rel=1e-4)
    assert b[0]["images_encoded"] == a[0]["images_encoded"]       # frozen rows are encoded, without gradient
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-5)
    wa, wb = final_weights(run), final_weights(frozen)
    assert any(not torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa if "vision" in k)
    manifest = json.loads((frozen / "distill" / "manifest.json").read_text())
    assert manifest["config"]["frozen_negatives"] is True


def test_a_loss_that_reads_no_negatives_loads_only_the_pairs_and_trains_as_if_every_entry_were_encoded(
        run, tmp_path, monkeypatch):
    from pipeline.data import DistillBatches
    from stages import distill as stage

    every_row = tmp_path / "every-row"
    shutil.copytree(run, every_row)
    build, spec = DistillBatches.build, stage.batch_spec
    seen = []   # per batch: (image rows, the pairs' image rows, caption rows, the pairs' caption rows)

    def recorded(self, rows):
        b = build(self, rows)
        seen.append((len(b["pixel_values"]), len(set(b["pair_image"].tolist())), len(b["input_ids"]),
                     len(set(b["pair_text"].tolist()))))
        return b

    monkeypatch.setattr(DistillBatches, "build", recorded)
    # the reference: batches holding every list entry (as for a loss that reads them), every row encoded
    monkeypatch.setattr(stage, "batch_spec", lambda cfg, *a: dataclasses.replace(
        spec(cfg, *a), outside="encode", outside_budget=None))
    monkeypatch.setattr(stage.Training, "live", lambda self, batch: {})
    distill(every_row, "--loss", "none", "--max-steps", "2", "--out-of-batch", "encode", "--shuffle-buffer", "0")
    reference, seen[:] = list(seen), []
    monkeypatch.undo()
    monkeypatch.setattr(DistillBatches, "build", recorded)
    distill(run, "--loss", "none", "--max-steps", "2", "--out-of-batch", "encode", "--shuffle-buffer", "0")
    assert any(i > pi or t > pt for i, pi, t, pt in reference)          # the lists name items outside the pairs
    assert seen and all(i == pi and t == pt for i, pi, t, pt in seen)   # none's batches load none of them
    assert [m["images_encoded"] for m in metrics(run)] == [float(pi) for _, pi, _, _ in seen]
    # the same training: none reads only the batch's pairs
    for x, y in zip(metrics(every_row), metrics(run), strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
    # Adam divides by the gradient's own size, so last-bit differences of near-zero gradients (the pairs are
    # encoded in a smaller batch) become a few % of a step; a real difference would be whole steps (lr 2e-3)
    want, got = final_weights(every_row), final_weights(run)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- runs that travel
def _moved_student(run, tiny_clip, tmp_path):
    """The run as if copied to a machine where mine's student is not where mine found it, but at `moved`."""
    moved = tmp_path / "new-home" / "student"
    shutil.copytree(tiny_clip, moved)
    manifest = json.loads((run / "mine" / "manifest.json").read_text())
    manifest["locations"]["student"] = str(tmp_path / "old-home" / "student")
    (run / "mine" / "manifest.json").write_text(json.dumps(manifest))
    return moved


def test_a_run_follows_its_student_to_a_new_folder_and_extends_there(run, tiny_clip, tmp_path):
    moved = _moved_student(run, tiny_clip, tmp_path)
    line = _error(distill(run, "--max-steps", "2", expect=2))
    assert "was mined with the student at" in line and "which is gone; pass --student" in line
    proc = cli_subprocess("distill", "--run", run, *FAST, "--max-steps", "4", "--save-every", "2", "--student", moved,
                          env={"CPRD_FAULT": "step:3"})
    assert proc.returncode == -signal.SIGKILL
    shutil.move(str(moved), str(tmp_path / "third-home"))                        # moved again, mid-run
    out = distill(run, "--max-steps", "4", "--save-every", "2", "--student", tmp_path / "third-home").output
    assert "resuming from step-2" in out
    out = distill(run, "--max-steps", "6", "--student", tiny_clip).output        # the same files, another path
    assert "extending: 4 steps trained, continuing to 6" in out
    assert [m["step"] for m in metrics(run)] == list(range(1, 7))


def test_a_second_teachers_scores_live_beside_the_first(run, tiny_blip, tmp_path):
    other = tmp_path / "teacher-itc"
    cli("score-teacher", "--run", run, "--teacher", tiny_blip, "--images-per-shard", "8", "--score", "itm+itc",
        "--out", other)
    scored = json.loads((other / "manifest.json").read_text())
    assert (other / SUCCESS).exists() and scored["fingerprint"] != \
        json.loads((run / "teacher" / "manifest.json").read_text())["fingerprint"]
    distill(run, "--max-steps", "1", "--scores", other, "--out", tmp_path / "student-itc")
    made = json.loads((tmp_path / "student-itc" / "manifest.json").read_text())
    assert made["identity"]["upstream"] == scored["fingerprint"]
    assert made["locations"]["scores"] == str(other.resolve())
    line = _error(cli("score-teacher", "--run", run, "--teacher", tiny_blip, "--out", other, expect=2))
    assert "made with different settings" in line and "or another --out folder" in line


def test_a_log_with_missing_steps_is_refused_on_resume(run):
    proc = cli_subprocess("distill", "--run", run, *FAST, "--max-steps", "6", "--save-every", "4",
                          env={"CPRD_FAULT": "step:5"})
    assert proc.returncode == -signal.SIGKILL
    log = run / "distill" / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2]) + "\n")                                  # steps 3.. lost
    line = _error(distill(run, "--max-steps", "6", "--save-every", "4", expect=2))
    assert "2 of the 4 trained steps are missing from the log (first: step 3)" in line and "--force" in line
    distill(run, "--max-steps", "6", "--save-every", "4", "--force")             # --force: from the start
    assert [m["step"] for m in metrics(run)] == list(range(1, 7))


def test_a_damaged_latest_checkpoint_file_is_got_out_of_with_force(run):
    proc = cli_subprocess("distill", "--run", run, *FAST, "--max-steps", "4", "--save-every", "2",
                          env={"CPRD_FAULT": "step:3"})
    assert proc.returncode == -signal.SIGKILL
    (run / "distill" / "checkpoints" / "latest.json").write_text("{torn")
    line = _error(distill(run, "--max-steps", "4", expect=2))
    assert "latest.json: corrupt JSON" in line and "--force" in line
    out = distill(run, "--max-steps", "4", "--force").output
    assert "--force: starting over" in out and (run / "distill" / SUCCESS).exists()


def test_a_checkpoint_that_cannot_be_written_is_one_line_naming_it(run, monkeypatch):
    import accelerate

    def full(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full)
    line = _error(distill(run, "--max-steps", "2", expect=2))
    assert "checkpoints/step-2: the checkpoint could not be written" in line and "rerun to resume" in line


# ---------------------------------------------------------------- --contrastive: a SigLIP student's sigmoid loss
@pytest.fixture(scope="module")
def siglip_run(tmp_path_factory, tiny_siglip, tiny_blip):
    """A complete mine + score-teacher run whose student is the tiny SigLIP. Copy it before writing to it."""
    from conftest import write_albef_corpus

    root = tmp_path_factory.mktemp("siglip")
    ann = write_albef_corpus(root / "data")
    cli("mine", "--run", root / "run", "--data", ann, "--student", tiny_siglip, "--k", "6", "--shard-size", "7")
    cli("score-teacher", "--run", root / "run", "--teacher", tiny_blip, "--images-per-shard", "8")
    return root / "run"


@pytest.fixture
def srun(tmp_path, siglip_run):
    shutil.copytree(siglip_run, tmp_path / "run")
    return tmp_path / "run"


def _reference_modules():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline" / "losses"))
    import reference
    return reference


def test_a_siglip_student_trains_its_bias_with_the_sigmoid_loss_end_to_end(srun, tiny_siglip, tmp_path):
    from transformers import AutoModel

    from conftest import write_albef_corpus

    distill(srun, "--max-steps", "3", "--batch-size", "48", "--shuffle-buffer", "0", "--out-of-batch", "drop")
    manifest = json.loads((srun / "distill" / "manifest.json").read_text())
    assert manifest["config"]["contrastive"] == "sigmoid" == manifest["identity"]["config"]["contrastive"]
    m = metrics(srun)
    # the first step's contrastive term is SigLIP's loss over the first batch's pairs, recomputed by a loop
    batch, enc = first_batch(srun, 48)
    with torch.no_grad():
        img = enc.image_features(batch["pixel_values"]).double()
        txt = enc.text_features({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}).double()
        log_scale, bias = enc.model.logit_scale.double()[0], float(enc.model.logit_bias)
    want = _reference_modules().sigmoid_ref(img[batch["pair_image"]], txt[batch["pair_text"]], log_scale, bias,
                                            batch["pair_positive_mask"])
    assert m[0]["itc"] == pytest.approx(float(want), rel=1e-4)
    assert m[0]["loss"] == pytest.approx(m[0]["itc"] + m[0]["distill"], rel=1e-5)
    # the bias is learned, logged, and saved in final/, which loads as a SigLIP and evaluates
    assert m[0]["logit_bias"] == pytest.approx(bias) and m[-1]["logit_bias"] != pytest.approx(bias, abs=1e-6)
    final = AutoModel.from_pretrained(srun / "distill" / "final")
    assert type(final).__name__ == "SiglipModel"
    assert float(final.logit_bias.detach()) == pytest.approx(final_weights(srun)["logit_bias"].item())
    assert float(final.logit_bias.detach()) != pytest.approx(bias, abs=1e-6)
    test = write_albef_corpus(tmp_path / "test", n_images=8, seed=7)
    cli("evaluate", "--data", test, "--model", srun / "distill" / "final", "--out", srun / "eval")
    assert json.loads((srun / "eval" / "metrics.json").read_text())["rsum"] >= 0
    cli("report", "--run", srun)
    page = parse_report_html(srun / "report" / "index.html")
    assert page.sections == ["scores", "positives", "agreement", "training", "evaluations"] and not page.missing


def test_softmax_keeps_a_siglip_bias_frozen_and_auto_does_not_keep_that_choice(srun):
    from pathlib import Path

    student = json.loads((srun / "mine" / "manifest.json").read_text())["config"]["student"]
    bias = load_file(Path(student) / "model.safetensors")["logit_bias"].item()
    distill(srun, "--max-steps", "2", "--contrastive", "softmax")
    manifest = json.loads((srun / "distill" / "manifest.json").read_text())
    assert "contrastive" not in manifest["identity"]["config"]   # softmax: as every output made before the option
    assert final_weights(srun)["logit_bias"].item() == bias and "logit_bias" not in metrics(srun)[0]
    line = _error(distill(srun, "--max-steps", "2", expect=None))   # auto is sigmoid for this student
    assert "contrastive" in line and "--force" in line


def test_a_clip_student_keeps_its_fingerprint_and_refuses_the_sigmoid_loss(run):
    distill(run, "--max-steps", "1")
    manifest = json.loads((run / "distill" / "manifest.json").read_text())
    assert manifest["config"]["contrastive"] == "softmax" and "contrastive" not in manifest["identity"]["config"]
    assert "up to date" in distill(run, "--max-steps", "1", "--contrastive", "softmax").output
    line = _error(distill(run, "--max-steps", "1", "--contrastive", "sigmoid", expect=None))
    assert "--contrastive sigmoid needs a student with a learned logit bias" in line


def test_compute_loss_takes_the_sigmoid_term_and_the_bias_its_gradient(tiny_siglip):
    from pipeline.losses import itc_loss, registry, sigmoid_loss
    from pipeline.models import DualEncoder
    from stages.distill import StudentTowers, compute_loss

    enc = DualEncoder(str(tiny_siglip))
    towers = StudentTowers(enc, train_bias=True)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    tokens = enc.tokenize(["a red circle", "a blue star", "green"])
    img, txt, scale, bias = towers(pixels, tokens["input_ids"], tokens["attention_mask"])
    batch = {"pair_image": torch.tensor([0, 1, 2]), "pair_text": torch.tensor([0, 1, 2]),
             "pair_positive_mask": torch.eye(3, dtype=torch.bool)}
    none = registry.get("none")
    terms = compute_loss(none, none.options(), 1.0, img, txt, scale, batch, contrastive="sigmoid", bias=bias)
    torch.testing.assert_close(terms["itc"], sigmoid_loss(img, txt, scale, bias))
    terms["loss"].backward()
    assert enc.model.logit_bias.grad is not None and float(enc.model.logit_bias.grad.abs()) > 0
    soft = compute_loss(none, none.options(), 1.0, img, txt, scale, batch)
    torch.testing.assert_close(soft["itc"], itc_loss(img, txt, scale))
    with pytest.raises(ValueError, match="needs the student's logit bias"):
        compute_loss(none, none.options(), 1.0, img, txt, scale, batch, contrastive="sigmoid")
    assert not StudentTowers(DualEncoder(str(tiny_siglip))).model.logit_bias.requires_grad   # softmax: frozen


# ---------------------------------------------------------------- open_clip students
def _open_clip_or_skip():
    try:
        import open_clip
    except (ImportError, RuntimeError) as e:   # not installed, or its torchvision cannot load beside this torch
        pytest.skip(f"open_clip cannot be imported here: {e}")
    return open_clip


def test_an_open_clip_student_mines_distils_evaluates_and_its_final_folder_loads_in_open_clip(tmp_path, tiny_blip):
    """A tiny open_clip architecture with a learned bias (so auto trains it with the sigmoid loss), given as
    open_clip:ARCH@WEIGHTS, through every stage; final/ loads in open_clip and here with the trained weights."""
    import numpy as np

    from conftest import write_albef_corpus
    from pipeline import openclip
    from pipeline.models import DualEncoder
    from pipeline.tiny_models import save_tiny_open_clip

    open_clip = _open_clip_or_skip()
    weights = save_tiny_open_clip(tmp_path / "models" / "tiny-oc-e2e.safetensors", logit_bias=-10.0)
    run = tmp_path / "run"
    cli("mine", "--run", run, "--data", write_albef_corpus(tmp_path / "data"), "--student",
        f"open_clip:tiny-oc-e2e@{weights}", "--k", "6", "--shard-size", "7")
    cli("score-teacher", "--run", run, "--teacher", tiny_blip, "--images-per-shard", "8")
    distill(run, "--max-steps", "2")
    manifest = json.loads((run / "distill" / "manifest.json").read_text())
    assert manifest["config"]["contrastive"] == "sigmoid" and manifest["identity"]["student"]["open_clip"] == "tiny-oc-e2e"
    assert "logit_bias" in metrics(run)[0]
    final = run / "distill" / "final"
    assert (final / openclip.CONFIG).is_file() and not (final / "modules.json").exists()
    assert "student (the starting point): open_clip `tiny-oc-e2e` with" in (final / "README.md").read_text()

    # the trained weights: the last checkpoint's towers (StudentTowers.model = OpenClipModel, .clip = open_clip's)
    ckpt = load_file(run / "distill" / "checkpoints" / "step-2" / "model.safetensors")
    trained = {k.removeprefix("model.clip."): v for k, v in ckpt.items()}
    saved = load_file(final / openclip.WEIGHTS)
    assert set(saved) == set(trained) and all(torch.equal(saved[k], trained[k]) for k in saved)
    assert not torch.equal(saved["text_projection"], load_file(weights)["text_projection"])   # it trained
    assert saved["logit_bias"].item() != -10.0

    test = write_albef_corpus(tmp_path / "test", n_images=6, seed=7)
    records = json.loads(test.read_text())
    paths = [str(test.parent / r["image"]) for r in records]
    texts = [r["caption"][0] for r in records]
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-oc-e2e", pretrained=str(final / openclip.WEIGHTS))
    model.eval()
    with torch.no_grad():
        from PIL import Image
        want_img = model.encode_image(torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths]),
                                      normalize=True).numpy()
        want_txt = model.encode_text(open_clip.get_tokenizer("tiny-oc-e2e")(texts), normalize=True).numpy()
    ours = DualEncoder(str(final))
    np.testing.assert_allclose(ours.encode_images(paths, progress=False), want_img, atol=1e-5)
    np.testing.assert_allclose(ours.encode_texts(texts, progress=False), want_txt, atol=1e-5)
    cli("evaluate", "--data", test, "--run", run)
    assert json.loads((run / "eval" / "metrics.json").read_text())["model"].endswith("final")
    cli("report", "--run", run)
    page = parse_report_html(run / "report" / "index.html")
    assert page.sections == ["scores", "positives", "agreement", "training", "evaluations"] and not page.missing
