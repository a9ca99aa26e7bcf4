"""Stage two: train the student on the cached teacher scores.

    loss = contrastive(query-positive pairs) + distill_weight * <loss>(student logits, teacher scores)

over both directions, with the student's own logit scale turning cosines into logits, so that both terms
speak the same units. The contrastive term is CLIP's softmax loss (`itc_loss`) or, for a SigLIP-family student
(`--contrastive auto`), SigLIP's pairwise sigmoid loss (`sigmoid_loss`), which trains the logit bias too. The
distillation terms see scale x cosine without the bias: every registered loss compares logits within one list
(softmax, logsumexp, differences), where a shift shared by all of them cancels (tests/pipeline/losses/
test_sigmoid.py); only a loss on absolute logits (BCE against teacher probabilities, logit MSE) would need it.
`<loss>` is looked up by name in the loss registry (`pipeline/losses/registry.py`); this stage never branches
on it. Reads RUN/teacher (and RUN/mine/corpus); writes

RUN/distill/
  checkpoints/step-N/   Accelerate save_state (model, optimizer, RNG) + trainer_state.json
  checkpoints/latest.json   the last complete checkpoint (written after it)
  metrics.jsonl         one line per optimizer step: loss and each named term, lr, logit_scale (and logit_bias
                        under the sigmoid loss), false-negative counts, and on validation steps the `val_*`
                        metrics (with --val-data)
  final/                save_pretrained: model, image processor, tokenizer, README.md (model card) and the
                        sentence-transformers module files
  best/                 the same, of the step with the best validation RSUM (with --keep-best)
  trackers/             local tracker logs (with --report-to, e.g. tensorboard)

The file reads top to bottom: config, the loss of one batch, then `run` (inputs, identity, the output's
writer) and the recipe `Training`: set up, train (pipeline/loop.py's `Trainer`), save.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.utils.checkpoint

from pipeline import config as cfgmod
from pipeline import layout
from pipeline import teacher_scale as scales
from pipeline.artifacts import StageWriter, atomic_write_json, read_json, require_complete
from pipeline.card import write_card
from pipeline.config import choice_options, location, option, runtime
from pipeline.corpus import FORMATS, load_checked, read_source
from pipeline.data import PRIORITIES, BatchSpec, DistillBatches, Matches, Processors, list_rows
from pipeline.errors import PipelineError
from pipeline.log import make_result
from pipeline.losses import DistillInputs, DistillLoss, itc_loss, registry, sigmoid_loss
from pipeline.models import (DualEncoder, learns_bias, model_exists, model_identity, save_pretrained_folder,
                             write_st_modules)
from pipeline.loop import Length, Logged, Trainer, TrainingOptions, TrainingRuntime, accelerator, check_training
from pipeline.packing import in_batch_share, plan
from pipeline.validation import Validator


DIRECTIONS = ("both", "i2t", "t2i")   # --distill-directions
BATCHING = ("shuffle", "packed")      # --batching
OUT_OF_BATCH = ("budget", "encode", "drop")     # --out-of-batch
BUDGET_PER_QUERY = 3   # --out-of-batch budget's default: 768 per 256 queries, chosen on the demo's validation galleries
CONTRASTIVE = ("auto", "softmax", "sigmoid")   # --contrastive
VAL_SOURCE = ("val_format", "val_image_root", "val_image_column", "val_caption_column", "val_id_column")


@dataclass
class DistillOptions:
    """distill's own options; its config (below) adds the training options every training stage has."""
    run: str = runtime(None, "run directory: reads RUN/teacher, writes RUN/distill (spell it --run-dir under torchrun)")
    student: Optional[str] = location(None, "student to train (default: the student that mined RUN/mine, where mine "
                                            "found it): a transformers model, or an open_clip one as "
                                            "open_clip:ARCH@WEIGHTS_FILE or a folder with open_clip_config.json; "
                                            "identified by its files' hashes")
    scores: Optional[str] = runtime(None, "the teacher's scores to learn from: a score-teacher output folder "
                                          "(default RUN/teacher; another is made by score-teacher --out)")
    loss: str = option("cprd", "distillation loss added to the contrastive loss", choices=registry.names())
    loss_options: Any = choice_options("loss", registry.options_by_loss, "the chosen loss's own options")
    teacher_scale: str = option("logodds", "the scale the loss sees the teacher's scores on (negatives' and "
                                           "positives'): logodds (as stored: ITM log-odds) or prob (the match "
                                           "probability, their sigmoid; refused for a --score itm+itc cache, which "
                                           "keeps no log-odds apart). A loss's options in score units (a minimum "
                                           "score, a tie margin) are on this scale; --max-teacher-margin stays on "
                                           "the stored log-odds",
                                choices=scales.SCALES, added=True)
    # `list` names the option `--list`; no annotation of this class may use the builtin list (get_type_hints
    # would read this field's default instead)
    list: str = option("hard", "the candidate lists to learn from: hard (the mined top k) or easy (mine --easy's, "
                               "random or from the bottom of the student's ranking, with their teacher scores: the "
                               "same loss over easy negatives, on otherwise equal terms). A list is cut to its first "
                               "--num-negatives, the most similar: mine --easy as many as that for a uniform draw",
                       choices=layout.LISTS, added=True)
    num_negatives: int = option(8, "teacher-ranked hard negatives per query (the first of the mined k)", at_least=1)
    max_teacher_margin: Optional[float] = option(None, "drop candidates the teacher scores above the query's "
                                                       "positive by more than this (likely false negatives)")
    frozen_negatives: bool = option(False, "encode the hard negatives that are not also a query or positive of the "
                                           "batch without gradient: a step at 32 negatives costs well under half "
                                           "(make bench), but the distillation term then moves only each query "
                                           "and the batch's pairs, and on the demo that loses the teacher's gain",
                                    added=True)
    outside_grad_layers: Optional[int] = option(
        None, "encode the list entries outside the batch's pairs (the budget's, or every one with --out-of-batch "
              "encode) with gradient through only the last N transformer blocks of their tower (and its final norm "
              "and projection), the blocks below without: their backward costs about N/L of a whole tower's; 0 "
              "leaves the norm and projection alone (default: every block, the whole tower; on the demo a cut loses "
              "most of the teacher's gain)",
        added=True, at_least=0)
    grad_checkpointing: bool = runtime(False, "keep only each transformer block's input for the backward and run "
                                              "its forward again there (activation checkpointing, both towers): "
                                              "the same student, a step's activations cut to about a sixth for "
                                              "about a fifth more arithmetic (make bench, CLIP ViT-B/16: the "
                                              "default lists' step from 129 to 22 GiB in fp32). For steps that do "
                                              "not fit")
    batching: str = option("shuffle", "how an epoch's rows form batches: shuffle (rows through the streaming shuffle "
                                      "buffer) or packed (clusters of --cluster-size rows whose mined negatives are "
                                      "each other's queries, dealt in random order; pipeline/packing.py: on the demo "
                                      "it raises the share of in-batch list entries and costs the student recall)",
                           choices=BATCHING, added=True)
    out_of_batch: str = option("budget", "list entries whose image or caption is no query or positive of the batch, "
                                         "each one more image or caption to encode: budget (encode "
                                         "--out-of-batch-budget of them, by --out-of-batch-priority, with "
                                         "gradient, and drop the others' entries: on the demo, the teacher's gain "
                                         "at 1.7-2.2x the epoch of contrastive training on 2 CPU cores, 3.4x its "
                                         "FLOPs at CLIP ViT-B/16), encode (all of them, the whole lists: at 32 "
                                         "negatives most of a step, 2.7-3x the epoch on the demo, 6.3x the "
                                         "FLOPs) or drop (the batch's own pairs alone, as contrastive training "
                                         "encodes: little gain)",
                               choices=OUT_OF_BATCH, added=True)
    cluster_size: int = option(64, "with --batching packed: rows per cluster of mutual hard negatives; a batch "
                                   "holds batch-size / cluster-size clusters dealt at random", added=True,
                               at_least=1)
    out_of_batch_budget: Optional[int] = option(None, "with --out-of-batch budget: the images and captions outside "
                                                      "the batch's pairs encoded per batch (which ones: "
                                                      "--out-of-batch-priority); "
                                                      f"default {BUDGET_PER_QUERY} per query (x --batch-size)",
                                                added=True, at_least=1)
    out_of_batch_priority: str = option("teacher-rank", "with --out-of-batch budget: which outside images and "
                                                        "captions the budget encodes: teacher-rank (the most "
                                                        "weight, a listing weighing 1/sqrt(1 + its rank by teacher "
                                                        "score in its list), so each query's hardest negatives go "
                                                        "before the tail entries many lists share), "
                                                        "teacher-rank-steep (a listing weighing 1/(1 + its rank): "
                                                        "the hardest first by more; with --loss kl at 2 per query and "
                                                        "--distill-weight 1.5 it kept KL's gain on the demo) or listed (those the batch's "
                                                        "lists name most often; the rule before priorities)",
                                        choices=PRIORITIES, added=True)
    contrastive: str = option("auto", "the student's own contrastive term: softmax (CLIP's InfoNCE over the batch), "
                                      "sigmoid (SigLIP's pairwise loss; trains the logit bias too) or auto (sigmoid "
                                      "for a SigLIP-family student, one with a learned logit bias; else softmax)",
                              choices=CONTRASTIVE, added=True)
    distill_weight: float = option(1.0, "weight of the distillation term", at_least=0)
    distill_directions: str = option("both", "query directions the distillation term is taught on: both, i2t "
                                             "(image queries ranking captions) or t2i (text queries ranking images); "
                                             "the contrastive term always uses both", choices=DIRECTIONS, added=True)
    batch_size: int = option(64, "queries per micro-batch, per process", at_least=1)
    val_data: Optional[str] = location(None, "held-out annotation file, folder or dataset to evaluate on while "
                                             "training (recall, RSUM and, with the teacher, rank agreement); "
                                             "identified by its content")
    # --val-data is a corpus like mine's --data, described by the same options (pipeline.corpus.read_source)
    val_format: str = option("auto", "input format of --val-data (as mine's --format)", choices=FORMATS, added=True)
    val_image_root: Optional[str] = runtime(None, "folder that --val-data's relative image paths resolve against "
                                                  "(default: the annotation file's folder)")
    val_split: Optional[str] = option("val", "split of --val-data to read", added=True)
    val_image_column: str = option("image", "hf format: --val-data's image column", added=True)
    val_caption_column: str = option("text", "hf format: --val-data's caption column (a string or a list of "
                                             "strings)", added=True)
    val_id_column: Optional[str] = option(None, "hf format: a column of --val-data's image ids (default: file name "
                                                "stem)", added=True)
    eval_every: Optional[int] = option(None, "validate every N optimizer steps (default: at the end only)", added=True,
                                       at_least=1)
    val_teacher: bool = option(True, "score each validation query's top --val-k-test with the run's teacher for "
                                     "rank agreement (pairs are cached across validations)", added=True)
    val_k_test: int = option(16, "validation candidates per query the teacher scores", added=True, at_least=2)
    keep_best: bool = option(False, "keep the weights of the validation step with the best RSUM as OUT/best", added=True)
    out: Optional[str] = runtime(None, "output folder (default RUN/distill); several students can share one "
                                       "teacher cache")


@dataclass
class DistillConfig(TrainingRuntime, TrainingOptions, DistillOptions):
    """distill's options, then the training stages' shared ones (`pipeline.loop`)."""


# ---------------------------------------------------------------------------------------------- the loss
class StudentTowers(torch.nn.Module):
    """Both towers, the logit scale and (trained) bias in one forward, so DDP sees every parameter through
    forward()."""

    def __init__(self, encoder: DualEncoder, train_bias: bool = False, grad_checkpointing: bool = False):
        super().__init__()
        self.model = encoder.model
        self._encoder = [encoder]  # a list: not registered as a submodule
        self._blocks: Optional[tuple[torch.nn.ModuleList, torch.nn.ModuleList]] = None   # looked up once
        self.train_bias = train_bias
        if isinstance(getattr(self.model, "logit_bias", None), torch.nn.Parameter):
            # SigLIP's bias: trained by the sigmoid loss, else unused (and DDP needs every trained parameter used)
            self.model.logit_bias.requires_grad_(train_bias)
        if grad_checkpointing:
            for blocks in self.blocks("--grad-checkpointing"):
                for block in blocks:
                    recompute_in_backward(block)

    def blocks(self, option: str = "--outside-grad-layers") -> tuple[torch.nn.ModuleList, torch.nn.ModuleList]:
        """(image tower's, text tower's) transformer blocks; `option` is named if the student has none."""
        if self._blocks is None:
            self._blocks = self._encoder[0].tower_layers(option)
        return self._blocks

    def forward(self, pixel_values, input_ids, attention_mask, live_images=None, live_texts=None, others=True,
                others_grad_layers=None):
        """[Ui, D] and [Ut, D] unit-norm features, the logit scale and the logit bias (a scalar; zero unless
        `train_bias`: only the sigmoid loss reads it).

        live_images / live_texts ([Ui] / [Ut] bool, optional): the rows encoded with gradient; the others are
        encoded without it (others=True) or not at all, left zero (others=False: no loss reads them), or with
        gradient through their tower's last `others_grad_layers` blocks only (an int; with others=True).
        """
        enc = self._encoder[0]  # shares self.model; only its tokenizer-free feature helpers are used
        cut_img = cut_txt = None
        if others_grad_layers is not None:
            layers_img, layers_txt = self.blocks()
            cut_img, cut_txt = (layers_img, others_grad_layers), (layers_txt, others_grad_layers)
        img = _encode(enc.image_features, lambda rows: pixel_values[rows], len(pixel_values), live_images, others,
                      cut_img)
        txt = _encode(enc.text_features, lambda rows: {"input_ids": input_ids[rows],
                                                       "attention_mask": attention_mask[rows]},
                      len(input_ids), live_texts, others, cut_txt)
        scale = self.model.logit_scale.exp().clamp(max=100.0) if hasattr(self.model, "logit_scale") else \
            torch.tensor(1.0, device=img.device)
        bias = self.model.logit_bias.reshape(()) if self.train_bias else torch.zeros((), device=img.device)
        return img, txt, scale, bias


def _encode(features, select, n: int, live: Optional[torch.Tensor], others: bool,
            cut: Optional[tuple[torch.nn.ModuleList, int]] = None) -> torch.Tensor:
    """features(select(rows)) for all n rows, those outside `live` without gradient (or left zero), or with
    `cut` = (the tower's blocks, N) with gradient through the last N blocks only."""
    if live is None:
        return features(select(slice(None)))
    on, off = live.nonzero().squeeze(1), (~live).nonzero().squeeze(1)
    encoded = []   # (rows, their features); a tower is never called on no rows (its reshapes fail on them)
    if len(on):
        encoded.append((on, features(select(on))))                         # [n_live, D]
    if others and len(off):
        with torch.no_grad() if cut is None else gradient_from(*cut):
            encoded.append((off, features(select(off))))                   # [n - n_live, D]
    if not encoded:
        raise ValueError("_encode: no row is live and others=False: there is nothing to encode")
    out = encoded[0][1].new_zeros(n, encoded[0][1].shape[1])
    for rows, feats in encoded:
        out = out.index_copy(0, rows, feats)   # outside no_grad: the copies keep the live rows' graph
    return out


def recompute_in_backward(block: torch.nn.Module) -> None:
    """Make `block` keep only its inputs for the backward and run its forward again there (torch's non-reentrant
    activation checkpoint), whenever it runs with gradient; without gradient (validation, rows encoded without it,
    the blocks below a cut) it runs as it did. Module hooks still run once, outside the checkpoint, so
    `gradient_from`'s switch composes with it."""
    if getattr(block, "_recomputed_in_backward", False):   # wrapped once, however many towers share it
        return
    forward = block.forward

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed
    block._recomputed_in_backward = True


@contextlib.contextmanager
def gradient_from(blocks: torch.nn.ModuleList, n: int):
    """Within: a tower's forward runs without gradient below its last `n` blocks and with it from there on (those
    blocks, the final norm, the projection). The rows still move the top of the tower, and their backward, and
    the activations kept for it, cover n blocks instead of all of them."""
    def on(*_: Any) -> None:   # None: the block's inputs and outputs are left as they are
        torch.set_grad_enabled(True)

    n = min(n, len(blocks))                        # all of them: every block, the embeddings below still not
    handle = blocks[-n].register_forward_pre_hook(on) if n else blocks[-1].register_forward_hook(on)
    try:
        with torch.no_grad():
            yield   # no_grad's exit restores the grad mode it found, whatever the hook set
    finally:
        handle.remove()


def pairs_only(batch: dict, others: bool) -> dict[str, Any]:
    """StudentTowers' keyword arguments that encode with gradient only the images and captions of the batch's
    (query, positive) pairs; every other row is a hard negative only, encoded without gradient (others) or not
    at all."""
    live_images = torch.zeros(len(batch["pixel_values"]), dtype=torch.bool, device=batch["pair_image"].device)
    live_texts = torch.zeros(len(batch["input_ids"]), dtype=torch.bool, device=batch["pair_text"].device)
    return {"live_images": live_images.index_fill(0, batch["pair_image"], True),
            "live_texts": live_texts.index_fill(0, batch["pair_text"], True), "others": others}


def distill_inputs(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, batch: dict) -> DistillInputs:
    """Student logits of each row's positive and hard negatives, next to the teacher's scores."""
    # one table of [images; texts]: a row's query, positive and candidates index into it with offsets
    feats = torch.cat([img, txt])                                   # [Ui + Ut, D]
    i2t = batch["query_is_image"].long()                            # [B]
    n_img = img.shape[0]
    q = feats[batch["query"] + (1 - i2t) * n_img]                   # [B, D]
    pos = feats[batch["positive"] + i2t * n_img]                    # [B, D]
    cands = feats[batch["candidates"] + (i2t * n_img)[:, None]]     # [B, N, D]
    return DistillInputs(student=scale * torch.einsum("bd,bnd->bn", q, cands),
                         teacher=batch["teacher"], mask=batch["candidate_mask"],
                         student_positive=scale * (q * pos).sum(-1), teacher_positive=batch["teacher_positive"])


def compute_loss(loss: DistillLoss, options: Any, distill_weight: float, img: torch.Tensor, txt: torch.Tensor,
                 scale: torch.Tensor, batch: dict, directions: str = "both", contrastive: str = "softmax",
                 bias: Optional[torch.Tensor] = None, teacher_scale: str = "logodds") -> dict[str, torch.Tensor]:
    """Named terms; `loss` is their weighted sum. The loss sees the teacher's scores on `teacher_scale`
    (`pipeline/teacher_scale.py`).

    With `directions` i2t or t2i the distillation term is the loss over that direction's rows times their share
    of the batch, so each taught row weighs what it weighs with both (the other rows get no distillation).
    `contrastive` (softmax, sigmoid: resolved, never auto) picks the contrastive term, logged as `itc` either
    way; the sigmoid loss needs the student's logit `bias` (a scalar). The distillation term never sees the bias.
    """
    pairs = (img[batch["pair_image"]], txt[batch["pair_text"]])
    if contrastive == "sigmoid":
        if bias is None:
            raise ValueError("compute_loss: the sigmoid contrastive loss needs the student's logit bias (bias=)")
        itc = sigmoid_loss(*pairs, scale, bias, batch["pair_positive_mask"])
    else:
        itc = itc_loss(*pairs, scale, batch["pair_positive_mask"])
    terms = {"itc": itc}
    if loss.fn is not None:
        x = scales.rescale(distill_inputs(img, txt, scale, batch), teacher_scale)
        if directions == "both":
            parts = registry.named_terms(loss.fn(x, options))
        else:
            rows = batch["query_is_image"].bool() == (directions == "i2t")           # [B]
            share = rows.float().mean()   # 0 without such rows: each loss then gives zeros that carry a graph
            parts = {k: v * share for k, v in registry.named_terms(loss.fn(x.rows(rows), options)).items()}
        terms["distill"] = sum(parts.values())
        if len(parts) > 1:   # a loss of several terms: each is logged as distill/NAME
            terms.update({f"distill/{k}": v for k, v in parts.items()})
    terms["loss"] = itc + distill_weight * terms.get("distill", 0.0)
    return terms


# ---------------------------------------------------------------------------------------------- the stage
def run(cfg: DistillConfig) -> Path:
    check(cfg)
    out = Path(cfg.out) if cfg.out else layout.Run(Path(cfg.run)).distill
    acc, dist, log = accelerator(cfg, out)
    paths = layout.Run(Path(cfg.run), Path(cfg.scores) if cfg.scores else None)
    mine, teacher = _upstream(cfg, paths)
    cfg = dataclasses.replace(cfg, student=cfg.student or _mined_by(mine, paths))
    cfg = resolve_lists(dataclasses.replace(cfg, contrastive=resolve_contrastive(cfg.contrastive, cfg.student)))
    log("[distill] resolved config:\n" + cfgmod.render(cfg))
    identity = {"stage": "distill", "config": fingerprinted(cfg), "upstream": teacher["fingerprint"],
                "student": model_identity(cfg.student), "world_size": dist.world_size}
    # the validation corpus by content (it decides best/ and the val_* metrics), wherever it is read from
    val = read_source(cfg, "val_", bytes_dir=paths.images, log=log) if cfg.val_data else None
    if val is not None:
        identity["validation"] = val.content_hash()
    length = Length.of(cfg, teacher_rows(teacher, cfg.list), dist.world_size, "teacher rows")
    student = functools.cache(lambda: DualEncoder(cfg.student, device="cpu"))   # loaded once: precheck, then setup
    writer = StageWriter(out, identity, force=cfg.force, replace=cfg.replace, dist=dist, config=cfgmod.as_dict(cfg), log=log,
                         reads=[paths.mine, paths.teacher], precheck=student, elsewhere="another --out folder",
                         locations={"student": cfg.student, "scores": str(paths.teacher), "val_data": cfg.val_data},
                         growth=length.growth())
    if not writer.begin():
        return out
    with writer:
        Training(cfg, acc, paths, {"mine": mine, "teacher": teacher, "student": identity["student"]}, out, length,
                 student(), val).run(writer)
    make_result(acc.is_main_process)(f"[distill] done: {out / 'final'}")
    return out


def resolve_contrastive(given: str, student: str) -> str:
    """--contrastive as trained: auto is sigmoid for a student with a learned logit bias (SigLIP's family: read
    from its config), softmax otherwise; sigmoid for a student without a bias is refused."""
    if given == "softmax":
        return given
    biased = learns_bias(student)
    if given == "sigmoid" and not biased:
        raise PipelineError(f"--contrastive sigmoid needs a student with a learned logit bias (SigLIP); {student} "
                            "has none (use --contrastive softmax, or auto)")
    return "sigmoid" if biased else "softmax"


def fingerprinted(cfg: DistillConfig) -> dict[str, Any]:
    """The config's fingerprinted part, `contrastive` as resolved (so a student of another family is never
    judged up to date with the old choice), left out when softmax: the loss every output made before the option
    existed was trained with, so those stay up to date (a SigLIP student's, now sigmoid under auto, does not)."""
    config = cfgmod.fingerprinted(cfg)
    if cfg.contrastive == "softmax":
        config.pop("contrastive", None)
    # the lists as encoded: the budget's number (a manifest without one encoded the whole lists, the default
    # before budgets) and its priority unless listed (the only one before priorities), `out_of_batch` only for
    # drop; a loss without a term (the baseline) encodes no list and has no budget
    for key in ("out_of_batch", "out_of_batch_budget", "out_of_batch_priority"):
        config.pop(key, None)
    if cfg.out_of_batch == "drop":
        config["out_of_batch"] = "drop"
    elif (budget := encoded_budget(cfg)) is not None and reads_lists(cfg):
        config["out_of_batch_budget"] = budget
        if cfg.out_of_batch_priority != "listed":
            config["out_of_batch_priority"] = cfg.out_of_batch_priority
    return config


def reads_lists(cfg: DistillConfig) -> bool:
    """Whether the loss reads the candidate lists; one without a term (the baseline) neither loads nor encodes
    their items, and has no budget to fingerprint."""
    return registry.get(cfg.loss).fn is not None


def encoded_budget(cfg: DistillConfig) -> Optional[int]:
    """The images and captions outside a batch's pairs encoded per batch: --out-of-batch-budget (default
    BUDGET_PER_QUERY per query) under budget, or under encode where given (budget's earlier spelling); None for
    all of them (encode) or with drop."""
    if cfg.out_of_batch == "drop" or (cfg.out_of_batch == "encode" and cfg.out_of_batch_budget is None):
        return None
    return cfg.out_of_batch_budget or BUDGET_PER_QUERY * cfg.batch_size


def resolve_lists(cfg: DistillConfig) -> DistillConfig:
    """--out-of-batch as trained, so the printed config and the manifest name the budget: budget with its number
    (encode with a number is budget's earlier spelling)."""
    budget = encoded_budget(cfg)
    return dataclasses.replace(cfg, out_of_batch="budget", out_of_batch_budget=budget) if budget else cfg


def check(cfg: DistillConfig) -> None:
    """What the declared ranges and choices cannot say: options that need each other (the loop runs this for
    every round before the first stage starts)."""
    if not cfg.run:
        raise PipelineError("distill needs --run")
    check_training(cfg)
    if cfg.batching != "packed" and cfg.cluster_size != DistillOptions.cluster_size:
        raise PipelineError("--cluster-size sizes the clusters of --batching packed (add it, or leave the size out)")
    if cfg.out_of_batch_budget is not None and cfg.out_of_batch == "drop":
        raise PipelineError("--out-of-batch-budget sets what --out-of-batch budget encodes; --out-of-batch drop "
                            f"encodes none of those entries (got --out-of-batch-budget {cfg.out_of_batch_budget})")
    if cfg.outside_grad_layers is not None and (cfg.frozen_negatives or cfg.out_of_batch == "drop"):
        other = "--frozen-negatives (no block at all)" if cfg.frozen_negatives else \
            "--out-of-batch drop (no such entries)"
        raise PipelineError(f"--outside-grad-layers sets the blocks the entries outside the batch's pairs train "
                            f"through; it cannot go with {other}")
    if cfg.frozen_negatives and cfg.out_of_batch == "drop":
        raise PipelineError("--frozen-negatives encodes the list entries outside the batch without gradient; with "
                            "--out-of-batch drop there are none (add --out-of-batch encode)")
    given = [n for n in ("eval_every", "keep_best") if getattr(cfg, n)] + \
        [n for n in VAL_SOURCE if getattr(cfg, n) != getattr(DistillOptions, n)]
    if given and not cfg.val_data:
        raise PipelineError(f"--{given[0].replace('_', '-')} needs --val-data (a held-out corpus to validate on)")


def batch_spec(cfg: DistillConfig, rank: int = 0, world_size: int = 1) -> BatchSpec:
    lists = reads_lists(cfg)   # without: the batches load the pairs alone
    return BatchSpec(batch_size=cfg.batch_size, num_negatives=cfg.num_negatives, seed=cfg.seed,
                     shuffle_buffer=cfg.shuffle_buffer,
                     outside="drop" if cfg.out_of_batch == "drop" or not lists else "encode",
                     outside_budget=encoded_budget(cfg) if lists else None, outside_priority=cfg.out_of_batch_priority,
                     max_teacher_margin=cfg.max_teacher_margin, image_cache_mb=cfg.image_cache_mb, rank=rank,
                     world_size=world_size)


def teacher_rows(teacher: dict, which: str = "hard") -> int:
    return sum(teacher["shards"][f]["rows"] for f in layout.teacher_shards(teacher, which))


def _mined_by(mine: dict, paths: layout.Run) -> str:
    """The student that mined the run, where mine found it (absolute: a relative path may not resolve from here),
    if it is still there; a hub name as it was given."""
    where = (mine.get("locations") or {}).get("student") or mine["identity"]["student"].get("path") \
        or mine["config"]["student"]
    if model_exists(where, mine["identity"]["student"]):
        return where
    raise PipelineError(f"{paths.mine} was mined with the student at {where}, which is gone; pass --student with "
                        "the folder it is in now (its files are checked against the hashes mine recorded)")


def _upstream(cfg: DistillConfig, paths: layout.Run) -> tuple[dict, dict]:
    """The complete mine and teacher manifests, the teacher checked against the mine it was scored on and the
    options asked for."""
    run_dir = paths.root
    mine = require_complete(paths.mine, "mine", f"run `cprd-pipeline mine --run {run_dir} ...` first")
    teacher = require_complete(paths.teacher, "score-teacher",
                               f"run `cprd-pipeline score-teacher --run {run_dir} ...` first")
    if teacher["identity"]["upstream"] != mine["fingerprint"]:
        raise PipelineError(f"{paths.teacher} was scored on a different corpus or mining run than "
                            f"{paths.mine} (mine fingerprint {teacher['identity']['upstream'][:12]} vs "
                            f"{mine['fingerprint'][:12]}); rerun score-teacher")
    scales.check(cfg.teacher_scale, teacher, paths.teacher)
    if cfg.list == "easy":
        _check_easy(cfg, mine, teacher, paths)
    elif cfg.num_negatives > mine["k"]:
        raise PipelineError(f"--num-negatives {cfg.num_negatives} is more than the {mine['k']} hard negatives per "
                            f"query that RUN/teacher holds (mined with --k {mine['k']})")
    return mine, teacher


def _check_easy(cfg: DistillConfig, mine: dict, teacher: dict, paths: layout.Run) -> None:
    """--list easy needs mine's easy lists, scored, at least --num-negatives long."""
    easy = mine.get("easy") or 0
    if not easy or not layout.teacher_shards(teacher, "easy"):
        where = paths.mine if not easy else paths.teacher
        raise PipelineError(f"--list easy: {where} holds no easy candidates; run `cprd-pipeline mine --easy K` "
                            "(K >= --num-negatives) and score-teacher again")
    if cfg.num_negatives > easy:
        raise PipelineError(f"--num-negatives {cfg.num_negatives} is more than the {easy} easy candidates per "
                            f"query that {paths.teacher} holds (mined with --easy {easy})")


# what an out-of-memory error says, by --grad-checkpointing: the option keeps the run's identity, so a rerun with it
# resumes; smaller batches or budgets make another run
_OUT_OF_MEMORY = {
    False: "rerun with --grad-checkpointing (a few times less activation memory, the same student): it goes on from "
           "{checkpoint}; or lower --batch-size or --out-of-batch-budget and rerun with --force (a new run)",
    True: "lower --batch-size or --out-of-batch-budget and rerun with --force (a new run)"}


class Training:
    """distill's recipe, top to bottom: set up (corpus, student towers, validator), train with the shared
    `Trainer` (pipeline/loop.py: optimizer, schedule, logs, checkpoints, resume), save final/ (and best/)."""
    COUNTS = ("false_negatives", "dropped_by_margin", "negatives", "negatives_in_batch", "images_encoded",
              "texts_encoded")
    SHOWN = {"loss": "{loss:.4f}", "itc": "{itc:.4f}", "distill": "{distill:.4f}",
             "enc": "{images_encoded}i/{texts_encoded}t", "in_batch": "{in_batch_share:.0%}",
             "val_rsum": "{val_rsum:.1f}"}

    def __init__(self, cfg: DistillConfig, acc, paths: layout.Run, upstream: dict, out: Path, length: Length,
                 encoder: DualEncoder, val=None):
        self.cfg, self.acc, self.out, self.encoder, self.loss = cfg, acc, out, encoder, registry.get(cfg.loss)
        self.upstream = upstream          # the mine and teacher manifests and the student's identity (model card)
        self.corpus = load_checked(paths.corpus, cfg.image_root)
        self.files = [paths.teacher / f for f in layout.teacher_shards(upstream["teacher"], cfg.list)]
        self.groups = None                # (rows, cand_rows) of the teacher shards, with --batching packed
        self.kept = {"best": None}        # {"step", "rsum", "val"} of the best validation so far (--keep-best)
        self.last_val: Optional[dict] = None   # {"step", **metrics} of the last validation
        self.logit_scale = 0.0            # the student's scale at the last micro-step (logged per step)
        self.logit_bias: Optional[float] = None   # and its bias, when the sigmoid loss trains it
        towers = StudentTowers(encoder, train_bias=cfg.contrastive == "sigmoid",
                               grad_checkpointing=cfg.grad_checkpointing).train()
        if cfg.outside_grad_layers is not None and reads_lists(cfg):
            towers.blocks()   # a student without the blocks to cut is refused before training
        self.trainer = Trainer(cfg, acc, out, length, name="distill", model=towers,
                               batches=self.batches, step=self.step, logged=Logged(self.COUNTS, self.more, self.SHOWN),
                               validate=self.validate, extra_state=self.kept,
                               out_of_memory=_OUT_OF_MEMORY[cfg.grad_checkpointing])
        self.log, self.total_steps = self.trainer.log, length.total_steps
        encoder.device = str(acc.device)   # validation encodes with the training model, wherever it now is
        self.validator = _validator(cfg, val, upstream["teacher"], out, acc) \
            if val is not None and acc.is_main_process else None
        self.log(f"[distill] {teacher_rows(upstream['teacher'], cfg.list)} teacher rows ({cfg.list} lists), "
                 f"{length.steps_per_epoch} steps/epoch x {acc.num_processes} process(es), {length.total_steps} "
                 f"steps, loss itc + {cfg.distill_weight} x {cfg.loss}")

    def run(self, writer: StageWriter) -> None:
        """Resume, train, save final/ and finish the stage."""
        self.trainer.resume()
        if self.acc.is_main_process:   # best/ of a step after the checkpoint: the replay of those steps remakes it
            best, on_disk = self.kept["best"], read_json(self.out / "best" / "best.json")
            if on_disk is not None and (best is None or on_disk["step"] != best["step"]):
                shutil.rmtree(self.out / "best")
        self.trainer.train()
        best = self.kept["best"]
        self.trainer.finish(writer, self.save_final, also=("best",), extra={
            "best": {"dir": "best", "step": best["step"], "val_rsum": best["rsum"]}} if best else None)

    def batches(self, epoch: int, skip: int, stop: int) -> DistillBatches:
        cfg = self.cfg
        spec = batch_spec(cfg, self.acc.process_index, self.acc.num_processes)
        order = None
        if cfg.batching == "packed":
            started = time.perf_counter()
            if self.groups is None:
                self.groups = list_rows(self.files, Matches(self.corpus), cfg.num_negatives)
            order = plan(*self.groups, cfg.cluster_size, cfg.seed, epoch)
            self.log(f"[distill] epoch {epoch}: rows packed around their negatives in "
                     f"{time.perf_counter() - started:.1f} s, "
                     f"{100 * in_batch_share(*self.groups, order, cfg.batch_size):.0f}% of list entries in-batch")
        enc = self.encoder
        return DistillBatches(spec, self.files, self.corpus, Processors(enc.image_processor, enc.tokenizer,
                                                                        enc.max_length), epoch, stop, skip, order)

    def step(self, towers: StudentTowers, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """One micro-batch's named loss terms, and the images and captions it encoded."""
        cfg = self.cfg
        live = self.live(batch)
        encoded = lambda rows, key: float(live[key].sum()) if live and not live["others"] else float(len(rows))
        counts = {"images_encoded": encoded(batch["pixel_values"], "live_images"),
                  "texts_encoded": encoded(batch["input_ids"], "live_texts")}
        with self.acc.autocast():
            img, txt, scale, bias = towers(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                           **live)
        self.logit_scale = float(scale.detach())
        # the bias as this step used it (a view of the parameter: read before the optimizer moves it)
        self.logit_bias = float(bias.detach()) if cfg.contrastive == "sigmoid" else None
        terms = compute_loss(self.loss, cfg.loss_options, cfg.distill_weight, img.float(), txt.float(),
                             scale.float(), batch, cfg.distill_directions, cfg.contrastive, bias.float(),
                             teacher_scale=cfg.teacher_scale)
        return terms, counts

    def live(self, batch: dict) -> dict[str, Any]:
        """The rows to encode with gradient: all ({}), or the batch's pairs only, the hard negatives encoded without
        gradient (--frozen-negatives) or with it through the top of their towers (--outside-grad-layers). A loss
        that reads no list (none) encodes every row: its batches hold the pairs alone (`batch_spec`)."""
        if self.cfg.outside_grad_layers is not None:
            return {**pairs_only(batch, others=True), "others_grad_layers": self.cfg.outside_grad_layers}
        return pairs_only(batch, others=True) if self.cfg.frozen_negatives else {}

    def more(self, row: dict) -> dict[str, float]:
        """Logged per step beside the summed values: the logit scale (and bias, when trained) and the share of
        list entries in-batch."""
        share = {"in_batch_share": row["negatives_in_batch"] / row["negatives"]} if row.get("negatives") else {}
        bias = {"logit_bias": self.logit_bias} if self.logit_bias is not None else {}
        return {"logit_scale": self.logit_scale, **bias, **share}

    def validate(self, step: int) -> dict[str, float]:
        """The validation metrics at this step, if it is a validation step (main process; {} elsewhere); with
        --keep-best, a better RSUM replaces OUT/best."""
        cfg = self.cfg
        due = cfg.val_data and (step == self.total_steps or (cfg.eval_every and step % cfg.eval_every == 0))
        if not due:
            return {}
        val = {}
        if self.acc.is_main_process:
            val = self.validator(self.encoder)
            self.last_val = {"step": step, **val}
            best = self.kept["best"]
            if cfg.keep_best and (best is None or val["val_rsum"] > best["rsum"]):
                self.kept["best"] = {"step": step, "rsum": val["val_rsum"], "val": val}
                self.save(self.out / "best", "best", step, val)
        self.acc.wait_for_everyone()
        return val

    def save_final(self, folder: Path) -> None:
        step, val = self.trainer.state["step"], self.last_val
        val = val if val and val["step"] == step else None
        self.save(folder, "final", step, val and {k: v for k, v in val.items() if k != "step"})

    def save(self, folder: Path, which: str, step: int, val: Optional[dict]) -> None:
        """save_pretrained with processor, tokenizer, model card and sentence-transformers files, replacing
        `folder` at once (main process)."""
        cfg, teacher = self.cfg, self.upstream["teacher"]

        def extra(tmp: Path) -> None:
            if self.encoder.kind == "transformers":   # an open_clip folder is open_clip's own (pipeline.openclip)
                write_st_modules(tmp, self.encoder.max_length)
            write_card(tmp, title=f"{Path(cfg.student).name}, distilled ({cfg.loss})",
                       config={**cfgmod.fingerprinted(cfg), "student": cfg.student, "val_data": cfg.val_data},
                       student=self.upstream["student"],
                       teacher={**teacher["config"], "identity": teacher["identity"]["teacher"],
                                "teacher": (teacher.get("locations") or {}).get("teacher") or teacher["config"]["teacher"]},
                       mine=self.upstream["mine"]["config"], steps=step, last=self.trainer.last_row, val=val,
                       val_step=step, which=which, val_split=cfg.val_split)
            if which == "best":
                atomic_write_json(tmp / "best.json", {"step": step, "val": val})

        save_pretrained_folder(folder, self.acc.unwrap_model(self.trainer.model).model, self.encoder.image_processor,
                               self.encoder.tokenizer, extra)


def _validator(cfg: DistillConfig, corpus, teacher: dict, out: Path, acc) -> Validator:
    """The held-out corpus and, with --val-teacher, the run's teacher (where score-teacher found it) with a
    pair-score cache under OUT."""
    from pipeline.models import torch_dtype
    from pipeline.retrieval import ScoreCache
    from pipeline.teachers import load_teacher

    if not cfg.val_teacher:
        return Validator(corpus)
    t = teacher["config"]
    weight = t["itc_weight"] if t["score"] == "itm+itc" else 0.0
    device = str(acc.device)
    where = (teacher.get("locations") or {}).get("teacher") or t["teacher"]
    model = load_teacher(where, device, torch_dtype(t["dtype"], device), t.get("revision"),
                         t.get("trust_remote_code", False))
    return Validator(corpus, model, cfg.val_k_test, weight, ScoreCache(out / "val-teacher-scores.npz"),
                     out_of_memory="rerun with --no-val-teacher (the teacher stays off the GPU) and --force "
                                   "(a new run)")
