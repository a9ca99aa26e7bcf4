"""The training stages' one trainer, and the options and length every training stage shares.

A stage's recipe builds its model and hands `Trainer` the pieces that are its own; the trainer owns the rest:

    Trainer(cfg, acc, out, length, name=..., model=...,       the module to train (prepared by Accelerate here)
            batches=batches(epoch, skip, stop),               this process's micro-batches of an epoch, the first
                                                              `skip` passed over, ending before `stop`
            step=step(model, batch) -> (terms, counts),       one micro-batch's forward: named loss terms (tensors;
                                                              `loss` is backwarded) and counts of its own
            logged=Logged(...),                               counts, extra values and the progress bar
            groups=..., validate=validate(step) -> values,    optional: AdamW groups, validation metrics of a step,
            extra_state={...},                                the recipe's own state, kept in every checkpoint
            out_of_memory="...")                              what to do when a micro-batch does not fit the GPU

    trainer.resume(); trainer.train(); trainer.finish(writer, save)

It seeds, builds AdamW (`pipeline.training.param_groups`) and the warm-up + cosine schedule, accumulates and
clips gradients, writes one line of OUT/metrics.jsonl per optimizer step (and the same values to the trackers
of --report-to), checkpoints every --save-every steps, at the end and on SIGINT/SIGTERM (`pipeline.checkpoints`),
and resumes exactly: the same batches in the same order, mid-epoch included. A micro-batch that runs out of GPU
memory stops the run with one line: the step, the micro-batch's images and captions and the stage's
`out_of_memory` advice (with the checkpoint a rerun goes on from, where the advice keeps the run's identity). A run
extended to a longer length (`Length.growth`) resumes from its last checkpoint with the schedule recomputed for the
new length.
"""
from __future__ import annotations

import json
import math
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from string import Formatter
from typing import Any, Callable, Iterable, Optional

import torch
from tqdm.auto import tqdm

from . import checkpoints, faults
from .artifacts import Growth, atomic_write_bytes, read_jsonl
from .config import as_dict, option, runtime
from .data import loader
from .errors import PipelineError
from .log import make_log
from .training import backward_step, param_groups, warmup_cosine

Terms = dict[str, torch.Tensor]     # named loss terms of a micro-batch; "loss" is the one backwarded
Counts = dict[str, float]           # things counted in a micro-batch (summed over micro-batches and processes)


# A training stage's config is `class XConfig(TrainingRuntime, TrainingOptions, XOptions)`: a dataclass lists the
# fields of its last base first, so `--help` shows the stage's own options, then these, then how it runs.
@dataclass
class TrainingOptions:
    """What every training stage's output depends on, beyond its own options: optimizer, length, precision."""
    lr: float = option(1e-5, "peak learning rate (AdamW)", above=0)
    weight_decay: float = option(0.02, "AdamW weight decay (not on biases, norms, embeddings, the logit scale)",
                                 at_least=0)
    warmup_steps: int = option(0, "linear warm-up steps, then cosine decay to zero", at_least=0)
    max_steps: Optional[int] = option(None, "optimizer steps to train (exclusive with --epochs)", at_least=1)
    epochs: Optional[int] = option(None, "passes over the training rows (default 1)", at_least=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", at_least=1)
    mixed_precision: str = option("no", "no | bf16 | fp16 (fp16 needs a GPU; bf16 works on CPU too)",
                                  choices=("no", "bf16", "fp16"))
    seed: int = option(0, "seed for initialisation, shuffling, the positive used and sampled negatives", at_least=0)
    shuffle_buffer: int = option(10000, "rows in the streaming shuffle buffer (0: none, the files' order)",
                                 at_least=0)
    max_grad_norm: float = option(1.0, "gradient clipping (0 = off)", at_least=0)


@dataclass
class TrainingRuntime:
    """How a training stage runs, not what it makes (kept out of the fingerprint)."""
    save_every: int = runtime(500, "save a resumable checkpoint every N optimizer steps (and at the end)", at_least=1)
    num_workers: int = runtime(0, "DataLoader workers that load images", at_least=0)
    image_cache_mb: float = runtime(512, "processed images kept per loader worker (LRU), in MB", at_least=0)
    report_to: Optional[str] = runtime(None, "trackers that receive every logged value, comma-separated: "
                                             "tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, ... "
                                             "(Accelerate's; install the tracker's package); local logs go to "
                                             "OUT/trackers")
    image_root: Optional[str] = runtime(None, "where RUN/mine's images are now, if their folder moved since mine "
                                              "ran (default: the folder mine recorded)")
    device: str = runtime("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    force: bool = runtime(False, "train again from the start, whatever the output folder holds (checkpoints "
                                 "included)")
    replace: bool = runtime(False, "replace an output made with other settings, keep one that is up to date (what "
                                   "`demo --force` and `loop --force` pass each stage)")


def check_training(cfg: Any) -> None:
    """What every training stage checks of `TrainingOptions`/`TrainingRuntime` beyond their declared ranges: one
    of --max-steps and --epochs at most, and a mixed precision this machine can run."""
    if cfg.max_steps is not None and cfg.epochs is not None:
        raise PipelineError("give --max-steps or --epochs, not both")
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if cfg.mixed_precision == "fp16" and on_cpu:
        # Accelerate runs fp16 on a CPU without autocast or a loss scaler: it would silently train in fp32
        raise PipelineError("--mixed-precision fp16 needs a GPU; on the CPU use --mixed-precision bf16 (or no)")


def accelerator(cfg: Any, out: Path) -> tuple[Any, Any, Any]:
    """(Accelerator, Dist, log) of a training stage: its mixed precision, accumulation, device and trackers."""
    from accelerate import Accelerator

    from .dist import Dist

    acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                      cpu=cfg.device == "cpu", log_with=trackers(cfg.report_to),
                      project_dir=str(out / "trackers") if cfg.report_to else None)
    if cfg.device == "cuda" and acc.device.type != "cuda":
        raise PipelineError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    dist = Dist(rank=acc.process_index, world_size=acc.num_processes, local_rank=acc.local_process_index)
    return acc, dist, make_log(acc.is_main_process)


@dataclass(frozen=True)
class Length:
    """How long a training stage runs, from its rows, --batch-size, --grad-accum, --max-steps / --epochs."""
    batches_per_epoch: int    # micro-batches per epoch and process (whole optimizer steps only)
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def of(cls, cfg: Any, rows: int, world_size: int, what: str) -> "Length":
        batches = math.ceil(rows / cfg.batch_size) // world_size   # per rank, equal on every rank
        if batches < cfg.grad_accum:
            raise PipelineError(f"{rows} {what} make {batches} batch(es) of {cfg.batch_size} per process, fewer "
                                f"than --grad-accum {cfg.grad_accum}; lower --batch-size")
        per_epoch = batches // cfg.grad_accum
        return cls(per_epoch * cfg.grad_accum, per_epoch, cfg.max_steps or per_epoch * (cfg.epochs or 1))

    def growth(self) -> Growth:
        """What lets a finished (or interrupted) run of this stage continue when only its length grew."""
        return Growth(keys=("max_steps", "epochs"), steps=self.total_steps, checkpoints=checkpoints.LATEST,
                      outputs=("final",))


@dataclass(frozen=True)
class Logged:
    """What a stage adds to each step's line of metrics.jsonl, and what its progress bar shows."""
    # names of counts: summed over the step's micro-batches and over processes, logged as integers; those found
    # in a batch are taken out of it before the step function sees it
    counts: tuple[str, ...] = ()
    # values computed once per step from its summed row (and the model): e.g. the logit scale, a share of counts
    more: Callable[[dict], dict] = lambda row: {}
    # progress bar: label -> template over the row and the last validation's values (shown when all are there)
    shown: dict[str, str] = field(default_factory=lambda: {"loss": "{loss:.4f}"})


class Trainer:
    """One training run: optimizer, schedule, the step loop, logs, trackers, checkpoints, resume, signals."""

    def __init__(self, cfg: Any, acc: Any, out: Path, length: "Length", *, name: str, model: torch.nn.Module,
                 batches: Callable[[int, int, int], Iterable[dict]], step: Callable[[Any, dict], tuple[Terms, Counts]],
                 logged: Logged = Logged(), groups: Optional[list[dict]] = None,
                 validate: Callable[[int], dict[str, float]] = lambda step: {},
                 extra_state: Optional[dict] = None,
                 out_of_memory: str = "lower --batch-size (and raise --grad-accum) and rerun with --force: a new run"):
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
        self.cfg, self.acc, self.out, self.length, self.name = cfg, acc, out, length, name
        self.batches, self.step, self.logged, self.validate = batches, step, logged, validate
        # what to do when a micro-batch does not fit the GPU, said in its error; "{checkpoint}" in it becomes where
        # a rerun goes on from, for advice that keeps the run's identity (a runtime setting)
        self.out_of_memory = out_of_memory
        self.saved_step = 0                  # the step of the last checkpoint (0: none), where a rerun goes on
        # the recipe's own state: saved in every checkpoint, restored in place on resume
        self.extra_state = {} if extra_state is None else extra_state
        self.log = make_log(acc.is_main_process)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay) if groups is None else groups, lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, cfg.warmup_steps, length.total_steps))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}   # where training is (the next batch to read)
        self.last_row: dict[str, Any] = {}   # the last line of metrics.jsonl (main process)
        self.last_val: dict[str, float] = {}  # the last validation's values (main process)

    def resume(self) -> None:
        """Continue from the last complete checkpoint, if any: weights, optimizer, RNG, schedule, position in the
        data and the stage's state; metrics.jsonl keeps its lines up to the checkpoint (all of them)."""
        ckpt = checkpoints.latest(self.out)
        if ckpt is not None:
            saved = checkpoints.load(self.acc, self.optimizer, ckpt)
            self.scheduler.load_state_dict(saved["scheduler"])
            self.state = {k: saved[k] for k in self.state}
            self.saved_step = self.state["step"]
            self.extra_state.update({k: saved[k] for k in self.extra_state if k in saved})
            self.log(f"[{self.name}] resuming from {ckpt.name}: step {self.state['step']}, "
                     f"epoch {self.state['epoch']}, batch {self.state['batch_in_epoch']}")
        if self.acc.is_main_process:
            self.last_row = keep_metrics(self.out / "metrics.jsonl", self.state["step"])

    def train(self) -> None:
        """Optimizer steps up to the run's length; the trackers are open meanwhile."""
        if self.cfg.report_to:
            self.acc.init_trackers(self.name, config=tracker_config(as_dict(self.cfg)))
        try:
            with Stop(self.acc) as signals:
                self._steps(signals)
        finally:
            if self.cfg.report_to:
                self.acc.end_training()

    def _steps(self, signals: "Stop") -> None:
        cfg, acc, state, total = self.cfg, self.acc, self.state, self.length.total_steps
        per_epoch = self.length.batches_per_epoch
        step, epoch = state["step"], state["epoch"]
        # the bar closes (ending its line) before any error is printed
        with tqdm(total=total, initial=step, desc=self.name, unit="step", disable=not acc.is_main_process) as bar:
            while step < total:
                skip = state["batch_in_epoch"] if epoch == state["epoch"] else 0
                stop = min(per_epoch, skip + (total - step) * cfg.grad_accum)  # no more than what is left
                sums: dict[str, float] = {}
                for batch_in_epoch, batch in enumerate(loader(self.batches(epoch, skip, stop), cfg.num_workers),
                                                       start=skip):
                    if "error" in batch:
                        raise PipelineError(batch["error"])
                    for k, v in self._micro_step(batch, step + 1).items():
                        sums[k] = sums.get(k, 0.0) + v
                    if not acc.sync_gradients:
                        continue
                    step += 1
                    self._log(step, epoch, sums, bar, self.validate(step))
                    sums = {}
                    done_epoch = batch_in_epoch + 1 == per_epoch
                    stopping = signals.requested()
                    if step % cfg.save_every == 0 or step == total or stopping:
                        checkpoints.save(acc, self.out, step, {
                            "step": step, "epoch": epoch + done_epoch,
                            "batch_in_epoch": 0 if done_epoch else batch_in_epoch + 1,
                            **self.extra_state, "scheduler": self.scheduler.state_dict()})
                        self.saved_step = step
                    if stopping:
                        bar.close()
                        self.log(f"[{self.name}] {stopping}: saved a checkpoint at step {step}")
                        raise KeyboardInterrupt
                    faults.at("step", step)
                epoch += 1
        state.update(step=step, epoch=epoch, batch_in_epoch=0)

    def _micro_step(self, batch: dict, step: int) -> dict[str, float]:
        """Forward, backward and (when the accumulation is complete) the optimizer step of one micro-batch;
        returns its share of the step's logged values: each term / grad_accum, and the counts."""
        acc, cfg = self.acc, self.cfg
        counts = {k: float(batch.pop(k)) for k in self.logged.counts if k in batch}
        images, texts = len(batch.get("pixel_values", ())), len(batch.get("input_ids", ()))
        try:
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with acc.accumulate(self.model):
                terms, own = self.step(self.model, batch)
                backward_step(acc, self.model, self.optimizer, terms, step, cfg.max_grad_norm)
        except torch.cuda.OutOfMemoryError as e:
            where = f"its checkpoint of step {self.saved_step}" if self.saved_step else "the start (no checkpoint yet)"
            raise PipelineError(f"out of GPU memory at step {step}, on a micro-batch of {images} images and {texts} "
                                f"captions: {self.out_of_memory.format(checkpoint=where)}") from e
        return {**{k: float(v.detach()) / cfg.grad_accum for k, v in terms.items()}, **counts, **own}

    def _log(self, step: int, epoch: int, sums: dict[str, float], bar: Any, val: dict[str, float]) -> None:
        acc = self.acc
        self.scheduler.step()
        row = {"step": step, "epoch": epoch, **{k: mean_over_processes(acc, v) for k, v in sums.items()},
               "lr": self.scheduler.get_last_lr()[0]}
        for k in self.logged.counts:   # counts: summed over processes, not averaged
            if k in row:
                row[k] = int(round(row[k] * acc.num_processes))
        row.update(self.logged.more(row))
        row.update(val)
        if self.cfg.report_to:
            acc.log({k: v for k, v in row.items() if k != "step"}, step=step)
        if acc.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            self.last_row, self.last_val = row, val or self.last_val
            values = {**self.last_val, **row}
            bar.set_postfix({label: template.format(**values) for label, template in self.logged.shown.items()
                             if {f for _, f, _, _ in Formatter().parse(template) if f} <= values.keys()})
            bar.update(1)

    def finish(self, writer: Any, save: Callable[[Path], None], also: tuple[str, ...] = (),
               extra: Optional[dict] = None) -> None:
        """save(OUT/final) (main process), then record final/, the folders `also` names and metrics.jsonl in
        the manifest and finish the stage."""
        def files() -> list[str]:
            return [f"{d}/{f.name}" for d in ("final", *also) if (self.out / d).exists()
                    for f in sorted((self.out / d).iterdir())] + ["metrics.jsonl"]

        if self.acc.is_main_process:
            save(self.out / "final")
            for rel in files():
                writer.record_file(rel)
        self.acc.wait_for_everyone()
        writer.finish(files(), extra={"steps": self.state["step"], "final": "final", **(extra or {})})


def keep_metrics(path: Path, step: int) -> dict[str, Any]:
    """Cut metrics.jsonl back to the lines of steps up to `step` (those of a resumed checkpoint); returns the last.
    Refuses a log with steps missing: it cannot be rebuilt, and would reach the model card and the report."""
    kept = [row for row in read_jsonl(path) if row.get("step", 0) <= step]
    missing = sorted(set(range(1, step + 1)) - {row.get("step") for row in kept})
    if missing:
        raise PipelineError(f"{path}: {len(missing)} of the {step} trained steps are missing from the log (first: "
                            f"step {missing[0]}); it cannot be rebuilt: rerun with --force to train again from the "
                            "start")
    atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in kept).encode())
    return kept[-1] if kept else {}


class Stop:
    """SIGINT/SIGTERM noted, not obeyed at once: training stops after the current optimizer step, with a
    checkpoint. A second signal acts as usual. All processes agree, so that the checkpoint is collective."""

    def __init__(self, acc: Any):
        self.acc, self.signal, self._old = acc, None, {}

    def __enter__(self) -> "Stop":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._note)
        return self

    def _note(self, signum: int, frame: Any) -> None:
        self.signal = signum
        for s, old in self._old.items():   # a second signal is not caught
            signal.signal(s, old)

    def requested(self) -> Optional[str]:
        """The signal's name on every process if any process got one, else None."""
        flag = self.signal is not None
        if self.acc.num_processes > 1:
            flag = bool(self.acc.reduce(torch.tensor(int(flag), device=self.acc.device), "sum") > 0)
        return (signal.Signals(self.signal).name if self.signal else "a signal to another process") if flag else None

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def mean_over_processes(acc: Any, value: float) -> float:
    if acc.num_processes == 1:
        return value
    return float(acc.reduce(torch.tensor(value, device=acc.device), "mean"))


def trackers(report_to: Optional[str]) -> Optional[list[str]]:
    """--report-to as Accelerate's tracker names, each checked to be known and installed."""
    if not report_to:
        return None
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    names = [n.strip() for n in report_to.split(",") if n.strip()]
    available = {str(t) for t in get_available_trackers()}
    for n in names:
        if n not in LOGGER_TYPE_TO_CLASS:
            raise PipelineError(f"--report-to: unknown tracker '{n}' (known: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))})")
        if n not in available:
            raise PipelineError(f"--report-to {n}: its package is not installed (pip install {n})")
    return names


def tracker_config(config: dict, prefix: str = "") -> dict:
    """A nested config as flat scalars (trackers take numbers, strings and booleans)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(tracker_config(v, f"{prefix}{k}."))
        elif v is None or isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = "" if v is None else v
    return out
