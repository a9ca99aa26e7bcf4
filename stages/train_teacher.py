"""Fine-tune the cross-encoder teacher on the run's corpus, with the student's mined hard negatives.

LoopITR's first half: the dual encoder supplies hard negatives to the cross-encoder. Per query of RUN/mine, a
positive pair, a hard negative drawn from its first --num-negatives candidates by the student's similarity
(ALBEF/BLIP's ITM sampling) and, with --in-batch-negatives, one from another query of the batch; the loss is the
matching head's binary cross-entropy over those pairs (for BLIP's two-way head this is exactly its softmax
cross-entropy), plus, with --itc-weight, BLIP's own contrastive loss over the batch's positive pairs.

    loss = BCE(match log-odds of each pair, its label) + itc_weight * itc(BLIP's projected [CLS] features)

Reads RUN/mine; writes

RUN/teacher-train/
  checkpoints/step-N/, checkpoints/latest.json, metrics.jsonl   the shared step loop (pipeline/loop.py)
  final/        save_pretrained: model, image processor, tokenizer; `score-teacher --teacher train-teacher`
                (or the folder) scores with it, and its manifest records the lineage

The file reads top to bottom: config, the loss of one batch, then `run` = setup, resume, train, finish.
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
from pipeline.dist import Dist
from pipeline.errors import PipelineError
from pipeline.log import make_result
from pipeline.loop import (Length, StepLoop, TrainingOptions, TrainingRuntime, accelerator, check_training, run_loop,
                           tracker_config)
from pipeline.losses import itc_loss
from pipeline.models import model_identity, save_pretrained_folder
from pipeline.teachers import BlipITM, CrossEncoder, blip_itc_features, load_teacher
from pipeline.training import backward_step, param_groups, warmup_cosine


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
    run_loop(lambda: TeacherTraining.setup(cfg, acc, dist, paths, mine, teacher, out, log, length), writer, acc,
             cfg.report_to)
    make_result(acc.is_main_process)(f"[train-teacher] done: {out / 'final'}")
    return out


def mined_queries(mine: dict) -> int:
    return sum(mine["shards"][p["file"]]["rows"] for p in mine["shard_plan"])


def check(cfg: TrainTeacherConfig) -> None:
    """What the declared ranges and choices cannot say (the loop runs this before the first stage starts)."""
    if not cfg.run or not cfg.teacher:
        raise PipelineError("train-teacher needs --run and --teacher")
    check_training(cfg)


class TeacherTraining(StepLoop):
    name = "train-teacher"
    COUNTS = ("false_negatives",)
    SHOWN = ("loss", "itm", "itc", "accuracy")

    def __init__(self, cfg: TrainTeacherConfig, acc, dist: Dist, out: Path, log, teacher: CrossEncoder, scorer,
                 optimizer, scheduler, corpus, files: list[Path], batches_per_epoch: int, total_steps: int):
        super().__init__(cfg, acc, out, log, optimizer, scheduler, batches_per_epoch, total_steps)
        self.dist, self.teacher, self.scorer, self.corpus, self.files = dist, teacher, scorer, corpus, files

    @classmethod
    def setup(cls, cfg: TrainTeacherConfig, acc, dist: Dist, paths: layout.Run, mine: dict, teacher: CrossEncoder,
              out: Path, log, length: Length) -> "TeacherTraining":
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
        corpus = load_checked(paths.corpus, cfg.image_root)
        scorer = Scorer(teacher, cfg).train()
        if cfg.train == "head":
            for name, p in scorer.named_parameters():
                p.requires_grad_(name.startswith(f"model.{teacher.head}"))
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]}
                  for g in param_groups(scorer, cfg.weight_decay)]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)

        files = [paths.mine / p["file"] for p in mine["shard_plan"]]
        total_steps = length.total_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, cfg.warmup_steps, total_steps))
        scorer, optimizer = acc.prepare(scorer, optimizer)
        teacher.device = str(acc.device)
        trained = sum(p.numel() for p in scorer.parameters() if p.requires_grad)
        log(f"[train-teacher] {mined_queries(mine)} mined queries, {length.steps_per_epoch} steps/epoch x "
            f"{dist.world_size} process(es), "
            f"{total_steps} steps, training {trained:,} parameters ({cfg.train})")
        if cfg.report_to:
            acc.init_trackers("train-teacher", config=tracker_config(cfgmod.as_dict(cfg)))
        return cls(cfg, acc, dist, out, log, teacher, scorer, optimizer, scheduler, corpus, files,
                   length.batches_per_epoch, total_steps)

    def batches(self, epoch: int, skip: int, stop: int) -> MatchingBatches:
        cfg, t = self.cfg, self.teacher
        spec = BatchSpec(batch_size=cfg.batch_size, num_negatives=cfg.num_negatives, seed=cfg.seed,
                         shuffle_buffer=cfg.shuffle_buffer, image_cache_mb=cfg.image_cache_mb,
                         rank=self.dist.rank, world_size=self.dist.world_size)
        return MatchingBatches(spec, self.files, self.corpus, Processors(t.image_processor, t.tokenizer, t.max_length),
                               epoch, stop, skip, temperature=cfg.sample_temperature, in_batch=cfg.in_batch_negatives)

    def micro_step(self, batch: dict, step: int) -> dict[str, float]:
        acc, cfg = self.acc, self.cfg
        counts = {k: float(batch.pop(k)) for k in self.COUNTS}
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        with acc.accumulate(self.scorer):
            with acc.autocast():
                terms = self.scorer(batch)
            backward_step(acc, self.scorer, self.optimizer, terms, step, cfg.max_grad_norm)
        return {**{k: float(v.detach()) / cfg.grad_accum for k, v in terms.items()}, **counts}

    def finish(self, writer: StageWriter) -> None:
        if self.acc.is_main_process:
            save_pretrained_folder(self.out / "final", self.acc.unwrap_model(self.scorer).model,
                                   self.teacher.image_processor, self.teacher.tokenizer)
        self.finish_outputs(writer, ("final",))

