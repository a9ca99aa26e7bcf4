"""Fine-tune the cross-encoder teacher on the run's corpus, with the student's mined hard negatives.

LoopITR's first half: the dual encoder supplies hard negatives to the cross-encoder. Per query of RUN/mine, a
positive pair, a hard negative drawn from its first --num-negatives candidates by the student's similarity
(ALBEF/BLIP's ITM sampling) and, with --in-batch-negatives, one from another query of the batch; the loss is the
matching head's binary cross-entropy over those pairs (for BLIP's two-way head this is exactly its softmax
cross-entropy), plus, with --itc-weight, BLIP's own contrastive loss over the batch's positive pairs.

    loss = BCE(match log-odds of each pair, its label) + itc_weight * itc(BLIP's projected [CLS] features)

Reads RUN/mine; writes

RUN/teacher-train/
  checkpoints/step-N/, checkpoints/latest.json, metrics.jsonl   the shared trainer (pipeline/loop.py)
  final/        save_pretrained: model, image processor, tokenizer; `score-teacher --teacher train-teacher`
                (or the folder) scores with it, and its manifest records the lineage

The file reads top to bottom: config, the loss of one batch, then `run` (inputs, identity, the output's writer)
and the recipe `TeacherTraining`: set up, train (pipeline/loop.py's `Trainer`), save.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from pipeline import config as cfgmod
from pipeline import layout
from pipeline.artifacts import StageWriter, require_complete
from pipeline.config import location, option, runtime
from pipeline.corpus import load_checked
from pipeline.data import BatchSpec, MatchingBatches, Processors
from pipeline.errors import PipelineError
from pipeline.log import make_result
from pipeline.loop import Length, Logged, Trainer, TrainingOptions, TrainingRuntime, accelerator, check_training
from pipeline.losses import itc_loss
from pipeline.models import model_identity, save_pretrained_folder
from pipeline.teachers import BlipITM, CrossEncoder, blip_itc_features, load_teacher
from pipeline.training import param_groups


@dataclass
class TrainTeacherOptions:
    """train-teacher's own options; its config (below) adds the training options every training stage has."""
    run: str = runtime(None, "run directory: reads RUN/mine, writes RUN/teacher-train (--run-dir under torchrun)")
    teacher: str = location(None, "cross-encoder to fine-tune: Hugging Face name or local folder (BLIP ITM, ViLT "
                                  "retrieval); identified by its files' hashes")
    revision: Optional[str] = option(None, "model revision on the hub")
    trust_remote_code: bool = option(False, "allow model code from the checkpoint (off unless you ask)")
    train: str = option("all", "what is trained: all = the whole cross-encoder, head = the matching head alone",
                        choices=("all", "head"))
    num_negatives: int = option(8, "a query's hard negative is drawn from its first N mined candidates", at_least=1)
    sample_temperature: float = option(0.05, "the draw's probabilities: softmax(student cosine / this); small = "
                                             "mostly the hardest", above=0)
    in_batch_negatives: bool = option(True, "also pair each query with another query's positive in the batch")
    itc_weight: float = option(0.0, "BLIP: weight of its contrastive (ITC) loss on the batch's positive pairs "
                                    "(trains the towers the itm+itc score uses)", at_least=0)
    itc_temperature: float = option(0.07, "BLIP: temperature of the ITC loss", above=0)
    batch_size: int = option(32, "queries per micro-batch, per process", at_least=1)
    out: Optional[str] = runtime(None, "output folder (default RUN/teacher-train)")


@dataclass
class TrainTeacherConfig(TrainingRuntime, TrainingOptions, TrainTeacherOptions):
    """train-teacher's options, then the training stages' shared ones (`pipeline.loop`)."""


# ---------------------------------------------------------------------------------------------- the loss
def matching_loss(teacher: CrossEncoder, batch: dict, itc_weight: float, itc_temperature: float
                  ) -> dict[str, torch.Tensor]:
    """Named terms of one batch; `loss` is their weighted sum."""
    state = teacher.encode_images(batch["pixel_values"], batch["pixel_mask"])             # per unique image
    tokens = {"input_ids": batch["input_ids"][batch["pair_text"]],
              "attention_mask": batch["attention_mask"][batch["pair_text"]]}
    logodds = teacher.score_indexed(state, batch["pair_image"], tokens)                   # [P]
    terms = {"itm": torch.nn.functional.binary_cross_entropy_with_logits(logodds.float(), batch["label"])}
    if itc_weight > 0:
        pos = batch["positive_pairs"]
        (image_embeds,) = state
        img, txt = blip_itc_features(teacher.model, image_embeds[batch["pair_image"][pos]],
                                     tokens["input_ids"][pos], tokens["attention_mask"][pos])
        terms["itc"] = itc_loss(img, txt, 1.0 / itc_temperature, batch["positive_mask"])
    terms["loss"] = terms["itm"] + itc_weight * terms.get("itc", 0.0)
    # how well the head separates this batch (before the update): positives above 0, negatives below
    with torch.no_grad():
        terms["accuracy"] = ((logodds > 0).float() == batch["label"]).float().mean()
    return terms


class Scorer(torch.nn.Module):
    """The cross-encoder as one module, so that Accelerate/DDP wrap and see every trained parameter."""

    def __init__(self, teacher: CrossEncoder, cfg: TrainTeacherConfig):
        super().__init__()
        self.model = teacher.model
        self._teacher = [teacher]   # a list: not registered as a submodule
        self.cfg = cfg

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return matching_loss(self._teacher[0], batch, self.cfg.itc_weight, self.cfg.itc_temperature)


# ---------------------------------------------------------------------------------------------- the stage
def run(cfg: TrainTeacherConfig) -> Path:
    check(cfg)
    paths = layout.Run(Path(cfg.run))
    out = Path(cfg.out) if cfg.out else paths.teacher_train
    acc, dist, log = accelerator(cfg, out)
    mine = require_complete(paths.mine, "mine", f"run `cprd-pipeline mine --run {paths.root} ...` first")
    log("[train-teacher] resolved config:\n" + cfgmod.render(cfg))
    # load before the output is touched: a model without a matching head fails here, with nothing replaced
    teacher = load_teacher(cfg.teacher, "cpu", torch.float32, cfg.revision, cfg.trust_remote_code, kv_cache=False)
    if cfg.itc_weight > 0 and not isinstance(teacher, BlipITM):
        raise PipelineError(f"--itc-weight: the ITC term trains BLIP's contrastive towers; "
                            f"{type(teacher.model).__name__} is trained on ITM only (leave it at 0)")
    identity = {"stage": "train-teacher", "config": cfgmod.fingerprinted(cfg), "upstream": mine["fingerprint"],
                "teacher": model_identity(cfg.teacher, cfg.revision), "world_size": dist.world_size}
    length = Length.of(cfg, mined_queries(mine), dist.world_size, "mined queries")
    writer = StageWriter(out, identity, force=cfg.force, replace=cfg.replace, dist=dist, config=cfgmod.as_dict(cfg), log=log,
                         reads=[paths.mine], growth=length.growth(),   # the teacher is loaded above
                         locations={"teacher": cfg.teacher})
    if not writer.begin():
        return out
    with writer:
        TeacherTraining(cfg, acc, paths, mine, teacher, out, length).run(writer)
    make_result(acc.is_main_process)(f"[train-teacher] done: {out / 'final'}")
    return out


def mined_queries(mine: dict) -> int:
    return sum(mine["shards"][p["file"]]["rows"] for p in mine["shard_plan"])


def check(cfg: TrainTeacherConfig) -> None:
    """What the declared ranges and choices cannot say (the loop runs this before the first stage starts)."""
    if not cfg.run or not cfg.teacher:
        raise PipelineError("train-teacher needs --run and --teacher")
    check_training(cfg)


class TeacherTraining:
    """train-teacher's recipe, top to bottom: set up (corpus, the trained parameters), train with the shared
    `Trainer` (pipeline/loop.py: optimizer, schedule, logs, checkpoints, resume), save final/."""
    SHOWN = {k: f"{{{k}:.4f}}" for k in ("loss", "itm", "itc", "accuracy")}

    def __init__(self, cfg: TrainTeacherConfig, acc, paths: layout.Run, mine: dict, teacher: CrossEncoder,
                 out: Path, length: Length):
        self.cfg, self.acc, self.teacher = cfg, acc, teacher
        self.corpus = load_checked(paths.corpus, cfg.image_root)
        self.files = [paths.mine / p["file"] for p in mine["shard_plan"]]
        scorer = Scorer(teacher, cfg).train()
        if cfg.train == "head":
            for name, p in scorer.named_parameters():
                p.requires_grad_(name.startswith(f"model.{teacher.head}"))
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]}
                  for g in param_groups(scorer, cfg.weight_decay)]
        self.trainer = Trainer(cfg, acc, out, length, name="train-teacher", model=scorer,
                               groups=[g for g in groups if g["params"]], batches=self.batches, step=self.step,
                               logged=Logged(counts=("false_negatives",), shown=self.SHOWN))
        teacher.device = str(acc.device)
        trained = sum(p.numel() for p in scorer.parameters() if p.requires_grad)
        self.trainer.log(f"[train-teacher] {mined_queries(mine)} mined queries, {length.steps_per_epoch} steps/epoch "
                         f"x {acc.num_processes} process(es), {length.total_steps} steps, training {trained:,} "
                         f"parameters ({cfg.train})")

    def run(self, writer: StageWriter) -> None:
        """Resume, train, save final/ and finish the stage."""
        self.trainer.resume()
        self.trainer.train()
        self.trainer.finish(writer, self.save)

    def batches(self, epoch: int, skip: int, stop: int) -> MatchingBatches:
        cfg, t = self.cfg, self.teacher
        spec = BatchSpec(batch_size=cfg.batch_size, num_negatives=cfg.num_negatives, seed=cfg.seed,
                         shuffle_buffer=cfg.shuffle_buffer, image_cache_mb=cfg.image_cache_mb,
                         rank=self.acc.process_index, world_size=self.acc.num_processes)
        return MatchingBatches(spec, self.files, self.corpus, Processors(t.image_processor, t.tokenizer, t.max_length),
                               epoch, stop, skip, temperature=cfg.sample_temperature, in_batch=cfg.in_batch_negatives)

    def step(self, scorer: Scorer, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """One micro-batch's named loss terms (no counts of its own: the batch's are taken by the trainer)."""
        with self.acc.autocast():
            return scorer(batch), {}

    def save(self, folder: Path) -> None:
        save_pretrained_folder(folder, self.acc.unwrap_model(self.trainer.model).model, self.teacher.image_processor,
                               self.teacher.tokenizer)
