"""Stage two: train the student on the cached teacher scores.

    loss = itc_loss(query-positive pairs) + distill_weight * <loss>(student logits, teacher scores)

over both directions, with the student's own logit scale turning cosines into logits, so that both terms
speak the same units. Reads RUN/teacher (and RUN/mine/corpus); writes

RUN/distill/
  checkpoints/step-N/   Accelerate save_state (model, optimizer, RNG) + trainer_state.json
  checkpoints/latest.json   the last complete checkpoint (written after it)
  metrics.jsonl         one line per optimizer step: loss, itc, distill, lr, logit_scale
  final/                save_pretrained: model, image processor, tokenizer
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from pipeline import config as cfgmod
from pipeline import losses
from pipeline.artifacts import StageWriter, atomic_write_json, read_json, require_complete
from pipeline.config import option, runtime
from pipeline.corpus import load_tables
from pipeline.data import DistillBatches, loader
from pipeline.dist import Dist
from pipeline.errors import PipelineError
from pipeline.log import make_log
from pipeline.models import DualEncoder, model_identity


@dataclass
class DistillConfig:
    run: str = runtime(None, "run directory: reads RUN/teacher, writes RUN/distill (spell it --run-dir under torchrun)")
    student: Optional[str] = option(None, "student to train (default: the student that mined RUN/mine)")
    loss: str = option("cprd", "distillation loss added to the contrastive loss", choices=losses.DISTILL_LOSSES)
    num_negatives: int = option(8, "teacher-ranked hard negatives per query (the first of the mined k)")
    num_valid: Optional[int] = option(4, "cprd: at most this many top negatives have their order taught")
    min_teacher_score: Optional[float] = option(None, "cprd: a negative is valid only if its teacher log-odds >= this")
    distill_weight: float = option(1.0, "weight of the distillation term")
    teacher_temperature: float = option(1.0, "kl: teacher scores are divided by this")
    batch_size: int = option(64, "queries per micro-batch, per process")
    lr: float = option(1e-5, "peak learning rate (AdamW)")
    weight_decay: float = option(0.02, "AdamW weight decay (not on biases, norms, logit scale)")
    warmup_steps: int = option(0, "linear warm-up steps, then cosine decay to zero")
    max_steps: Optional[int] = option(None, "optimizer steps to train (exclusive with --epochs)")
    epochs: Optional[int] = option(None, "passes over the teacher shards (default 1)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    mixed_precision: str = option("no", "no | bf16 | fp16", choices=("no", "bf16", "fp16"))
    seed: int = option(0, "seed for initialisation, shuffling and positive choice")
    shuffle_buffer: int = option(10000, "rows in the streaming shuffle buffer")
    max_grad_norm: float = option(1.0, "gradient clipping (0 = off)")
    out: Optional[str] = runtime(None, "output folder (default RUN/distill); several students can share one "
                                       "teacher cache")
    save_every: int = runtime(500, "save a resumable checkpoint every N optimizer steps (and at the end)")
    num_workers: int = runtime(0, "DataLoader workers that load images")
    image_cache_mb: float = runtime(512, "processed images kept per loader worker (LRU), in MB")
    device: str = runtime("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    force: bool = runtime(False, "replace an output made with other settings (and ignore its checkpoints)")


class StudentTowers(torch.nn.Module):
    """Both towers and the logit scale in one forward, so DDP sees every parameter through forward()."""

    def __init__(self, encoder: DualEncoder):
        super().__init__()
        self.model = encoder.model
        self._encoder = [encoder]  # a list: not registered as a submodule
        if isinstance(getattr(self.model, "logit_bias", None), torch.nn.Parameter):
            self.model.logit_bias.requires_grad_(False)  # SigLIP's bias: unused by these losses (DDP needs all used)

    def forward(self, pixel_values, input_ids, attention_mask):
        enc = self._encoder[0]  # shares self.model; only its tokenizer-free feature helpers are used
        img = enc.image_features(pixel_values)                            # [Ui, D], unit norm
        txt = enc.text_features({"input_ids": input_ids, "attention_mask": attention_mask})  # [Ut, D]
        scale = self.model.logit_scale.exp().clamp(max=100.0) if hasattr(self.model, "logit_scale") else \
            torch.tensor(1.0, device=img.device)
        return img, txt, scale


def compute_loss(cfg: DistillConfig, img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                 batch: dict) -> dict[str, torch.Tensor]:
    """Named terms; `loss` is their weighted sum."""
    itc = losses.itc_loss(img[batch["pair_image"]], txt[batch["pair_text"]], scale, batch["pair_positive_mask"])
    terms = {"itc": itc}
    if cfg.loss != "none":
        # one table of [images; texts]: a row's query, positive and candidates index into it with offsets
        feats = torch.cat([img, txt])                                   # [Ui + Ut, D]
        i2t = batch["query_is_image"].long()                            # [B]
        n_img = img.shape[0]
        q = feats[batch["query"] + (1 - i2t) * n_img]                   # [B, D]
        pos = feats[batch["positive"] + i2t * n_img]                    # [B, D]
        cands = feats[batch["candidates"] + (i2t * n_img)[:, None]]     # [B, N, D]
        s = scale * torch.einsum("bd,bnd->bn", q, cands)                # student logits of the hard negatives
        t, mask = batch["teacher"], batch["candidate_mask"]
        if cfg.loss == "cprd":
            d = losses.cprd_loss(s, t, mask, cfg.num_valid, cfg.min_teacher_score)
        elif cfg.loss == "listmle":
            d = losses.listmle_loss(s, t, mask)
        elif cfg.loss == "kl":
            d = losses.kl_loss(s, t, mask, cfg.teacher_temperature)
        elif cfg.loss == "ranknet":
            d = losses.ranknet_loss(s, t, mask)
        else:  # margin-mse
            d = losses.margin_mse_loss(scale * (q * pos).sum(-1), s, batch["teacher_positive"], t, mask)
        terms["distill"] = d
    terms["loss"] = itc + cfg.distill_weight * terms.get("distill", 0.0)
    return terms


def run(cfg: DistillConfig) -> Path:
    from accelerate import Accelerator

    # ---------------------------------------------------------------- setup
    if not cfg.run:
        raise PipelineError("distill needs --run")
    if cfg.max_steps is not None and cfg.epochs is not None:
        raise PipelineError("give --max-steps or --epochs, not both")
    for name in ("batch_size", "num_negatives", "grad_accum", "save_every"):
        if getattr(cfg, name) < 1:
            raise PipelineError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                      cpu=cfg.device == "cpu")
    if cfg.device == "cuda" and acc.device.type != "cuda":
        raise PipelineError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    dist = Dist(rank=acc.process_index, world_size=acc.num_processes, local_rank=acc.local_process_index)
    log = make_log(acc.is_main_process)
    run_dir = Path(cfg.run)
    mine = require_complete(run_dir / "mine", "mine", f"run `cprd-pipeline mine --run {run_dir} ...` first")
    teacher = require_complete(run_dir / "teacher", "score-teacher",
                               f"run `cprd-pipeline score-teacher --run {run_dir} ...` first")
    if teacher["identity"]["upstream"] != mine["fingerprint"]:
        raise PipelineError(f"{run_dir / 'teacher'} was scored on a different corpus or mining run than "
                            f"{run_dir / 'mine'} (mine fingerprint {teacher['identity']['upstream'][:12]} vs "
                            f"{mine['fingerprint'][:12]}); rerun score-teacher")
    if cfg.num_negatives > mine["k"]:
        raise PipelineError(f"--num-negatives {cfg.num_negatives} is more than the {mine['k']} hard negatives per "
                            f"query that RUN/teacher holds (mined with --k {mine['k']})")
    student = cfg.student or mine["config"]["student"]
    cfg = dataclasses.replace(cfg, student=student)
    log("[distill] resolved config:\n" + cfgmod.render(cfg))
    identity = {"stage": "distill", "config": cfgmod.fingerprinted(cfg), "upstream": teacher["fingerprint"],
                "student": model_identity(student), "world_size": dist.world_size}
    out = Path(cfg.out) if cfg.out else run_dir / "distill"
    writer = StageWriter(out, identity, force=cfg.force, dist=dist, config=cfgmod.as_dict(cfg), log=log)
    if not writer.begin():
        return out
    try:
        _train(cfg, acc, dist, writer, run_dir, teacher, student, log)
    except BaseException:
        writer.abort()
        raise
    log(f"[distill] done: {out / 'final'}")
    return out


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _train(cfg, acc, dist, writer, run_dir, teacher, student, log) -> None:
    from accelerate.utils import set_seed

    out = writer.dir
    set_seed(cfg.seed)
    corpus = load_tables(run_dir / "mine" / "corpus")
    encoder = DualEncoder(student, device="cpu")
    towers = StudentTowers(encoder).train()
    optimizer = torch.optim.AdamW(_param_groups(towers, cfg.weight_decay), lr=cfg.lr)

    files = [run_dir / "teacher" / f for f in teacher["expected_shards"] if not f.startswith("pairs/")]
    rows = sum(rec["rows"] for name, rec in teacher["shards"].items() if not name.startswith("pairs/"))
    batches_per_epoch = math.ceil(rows / cfg.batch_size) // dist.world_size   # per rank, equal on every rank
    if batches_per_epoch < cfg.grad_accum:
        raise PipelineError(f"{rows} teacher rows make {batches_per_epoch} batch(es) of {cfg.batch_size} per process, "
                            f"fewer than --grad-accum {cfg.grad_accum}; lower --batch-size")
    steps_per_epoch = batches_per_epoch // cfg.grad_accum
    batches_per_epoch = steps_per_epoch * cfg.grad_accum                     # no half-accumulated step
    total_steps = cfg.max_steps or steps_per_epoch * (cfg.epochs or 1)

    def lr_lambda(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    towers, optimizer = acc.prepare(towers, optimizer)

    # resume from the last complete checkpoint of this same fingerprint
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    latest = read_json(out / "checkpoints" / "latest.json")
    if latest is not None:
        ckpt = out / "checkpoints" / latest["dir"]
        acc.load_state(str(ckpt))
        state = read_json(ckpt / "trainer_state.json")
        scheduler.load_state_dict(state.pop("scheduler"))
        log(f"[distill] resuming from {ckpt.name}: step {state['step']}, epoch {state['epoch']}, "
            f"batch {state['batch_in_epoch']}")
    metrics_path = out / "metrics.jsonl"
    if acc.is_main_process:  # drop lines from steps after the checkpoint (they are redone)
        kept = [l for l in (metrics_path.read_text().splitlines() if metrics_path.exists() else [])
                if json.loads(l)["step"] <= state["step"]]
        metrics_path.write_text("".join(l + "\n" for l in kept))
    log(f"[distill] {rows} teacher rows, {steps_per_epoch} steps/epoch x {dist.world_size} process(es), "
        f"{total_steps} steps, loss itc + {cfg.distill_weight} x {cfg.loss}")

    # ---------------------------------------------------------------- train
    step, epoch = state["step"], state["epoch"]
    bar = tqdm(total=total_steps, initial=step, desc="distill", unit="step", disable=not acc.is_main_process)
    while step < total_steps:
        skip = state["batch_in_epoch"] if epoch == state["epoch"] else 0
        stop = min(batches_per_epoch, skip + (total_steps - step) * cfg.grad_accum)  # exactly what is left
        data = DistillBatches(files, corpus, encoder.image_processor, encoder.tokenizer, encoder.max_length,
                              cfg.batch_size, cfg.num_negatives, stop, cfg.seed, epoch,
                              cfg.shuffle_buffer, dist.rank, dist.world_size, skip, cfg.image_cache_mb)
        sums: dict[str, float] = {}
        for batch_in_epoch, batch in enumerate(loader(data, cfg.num_workers), start=skip):
            if "error" in batch:
                raise PipelineError(batch["error"])
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with acc.accumulate(towers):
                with acc.autocast():
                    img, txt, scale = towers(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
                terms = compute_loss(cfg, img.float(), txt.float(), scale.float(), batch)
                acc.backward(terms["loss"])
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(towers.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            if not acc.sync_gradients:
                continue
            scheduler.step()
            step += 1
            row = {"step": step, "epoch": epoch, **{k: _mean(acc, v) for k, v in sums.items()},
                   "lr": scheduler.get_last_lr()[0], "logit_scale": float(scale.detach())}
            sums = {}
            if acc.is_main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.4f}", itc=f"{row['itc']:.4f}")
                bar.update(1)
            done_epoch = batch_in_epoch + 1 == batches_per_epoch
            if step % cfg.save_every == 0 or step == total_steps:
                _save_checkpoint(acc, out, scheduler, step, epoch + done_epoch, 0 if done_epoch else batch_in_epoch + 1)
            _maybe_die_for_tests(step)
        epoch += 1
    bar.close()

    # ---------------------------------------------------------------- save
    final = out / "final"
    if acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        acc.unwrap_model(towers).model.save_pretrained(final)
        encoder.image_processor.save_pretrained(final)
        encoder.tokenizer.save_pretrained(final)
        for f in sorted(final.iterdir()):
            writer.record_file(f"final/{f.name}")
        writer.record_file("metrics.jsonl")
    acc.wait_for_everyone()
    expected = [f"final/{f.name}" for f in sorted(final.iterdir())] + ["metrics.jsonl"]
    writer.finish(expected, extra={"steps": step, "final": "final"})


def _mean(acc, value: float) -> float:
    if acc.num_processes == 1:
        return value
    return float(acc.reduce(torch.tensor(value, device=acc.device), reduction="mean"))


def _save_checkpoint(acc, out: Path, scheduler, step: int, epoch: int, batch_in_epoch: int) -> None:
    """save_state, then trainer_state.json, then latest.json: a checkpoint counts once latest.json names it."""
    ckpt = out / "checkpoints" / f"step-{step}"
    acc.save_state(str(ckpt))
    if acc.is_main_process:
        atomic_write_json(ckpt / "trainer_state.json", {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                                                        "scheduler": scheduler.state_dict()})
        previous = read_json(out / "checkpoints" / "latest.json")
        atomic_write_json(out / "checkpoints" / "latest.json", {"dir": ckpt.name, "step": step})
        if previous and previous["dir"] != ckpt.name:  # keep only the newest complete checkpoint
            shutil.rmtree(out / "checkpoints" / previous["dir"], ignore_errors=True)
    acc.wait_for_everyone()


def _maybe_die_for_tests(step: int) -> None:
    """CPRD_KILL_AT_STEP=N: SIGKILL this process after optimizer step N (how tests interrupt training)."""
    at = os.environ.get("CPRD_KILL_AT_STEP")
    if at and step == int(at):
        os.kill(os.getpid(), 9)
