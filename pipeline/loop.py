"""The resumable optimizer-step loop that the training stages (distill, train-teacher) share.

A stage subclasses `StepLoop` and supplies `batches(epoch, skip, stop)` (the epoch's micro-batches for this
process, the first `skip` passed over) and `micro_step(batch, step)` (forward, backward, optimizer step when the
accumulation completes; returns this micro-batch's share of the logged values). The loop owns the rest:

    OUT/checkpoints/step-N/     Accelerate save_state + trainer_state.json (step, epoch, batch, scheduler, extra,
                                and the SHA-256 of every file of the checkpoint, checked before resuming)
    OUT/checkpoints/latest.json the last complete checkpoint (written after it); older ones are removed
    OUT/metrics.jsonl           one line per optimizer step; lines after the resumed checkpoint are dropped

SIGINT and SIGTERM (a cluster's notice before a kill) end training at the next optimizer step with a checkpoint
of it; the run then exits as interrupted, and the same command resumes.

`self.cfg` is the stage's config, built on `TrainingOptions` and `TrainingRuntime` (below). Resume is exact: the
same batches in the same order, mid-epoch included.
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from . import faults
from .artifacts import Growth, atomic_write_bytes, atomic_write_json, read_json, read_jsonl, sha256_file
from .config import option, runtime
from .data import loader
from .errors import PipelineError


LATEST = "checkpoints/latest.json"    # names the last complete checkpoint: {"dir": "step-N", "step": N}


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


class StepLoop:
    name = "train"                     # log prefix and progress-bar label
    COUNTS: tuple[str, ...] = ()       # logged values summed over processes (others are averaged)
    SHOWN: tuple[str, ...] = ("loss",)  # values on the progress bar

    def __init__(self, cfg: Any, acc: Any, out: Path, log: Any, optimizer: Any, scheduler: Any,
                 batches_per_epoch: int, total_steps: int):
        self.cfg, self.acc, self.out, self.log = cfg, acc, out, log
        self.optimizer, self.scheduler = optimizer, scheduler
        self.batches_per_epoch, self.total_steps = batches_per_epoch, total_steps   # no half-accumulated step
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
        self.last_row: dict[str, Any] = {}   # the last line of metrics.jsonl (main process)

    # ------------------------------------------------------------------ supplied by the stage
    def batches(self, epoch: int, skip: int, stop: int) -> Any:
        raise NotImplementedError

    def micro_step(self, batch: dict, step: int) -> dict[str, float]:
        raise NotImplementedError

    def validate(self, step: int) -> dict[str, float]:
        """Values logged with this step beside the training terms (validation); none by default."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Kept in every checkpoint's trainer_state.json and restored into self.state on resume."""
        return {}

    def after_resume(self) -> None:
        """Reconcile outputs written after the resumed checkpoint (main process)."""

    def postfix(self, row: dict) -> dict[str, str]:
        return {k: f"{row[k]:.4f}" for k in self.SHOWN if k in row}

    # ------------------------------------------------------------------ the loop
    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def resume(self) -> None:
        """Load the last complete checkpoint of this fingerprint, if any; drop metric lines after it."""
        latest = read_json(self.out / LATEST)
        if latest is not None:
            ckpt = self.out / "checkpoints" / latest["dir"]
            saved = verified(ckpt)
            self.acc.load_state(str(ckpt))
            finite(self.acc, self.optimizer, ckpt)
            self.state = {**self.state, **saved}
            self.state.pop("files", None)
            self.scheduler.load_state_dict(self.state.pop("scheduler"))
            self.log(f"[{self.name}] resuming from {ckpt.name}: step {self.state['step']}, "
                     f"epoch {self.state['epoch']}, batch {self.state['batch_in_epoch']}")
        if self.acc.is_main_process:
            kept = [row for row in read_jsonl(self.metrics_path) if row.get("step", 0) <= self.state["step"]]
            missing = sorted(set(range(1, self.state["step"] + 1)) - {row.get("step") for row in kept})
            if missing:   # a log with holes would reach the model card and the report as if whole
                raise PipelineError(f"{self.metrics_path}: {len(missing)} of the {self.state['step']} trained steps are "
                                    f"missing from the log (first: step {missing[0]}); it cannot be rebuilt: "
                                    "rerun with --force to train again from the start")
            atomic_write_bytes(self.metrics_path, "".join(json.dumps(row) + "\n" for row in kept).encode())
            self.last_row = kept[-1] if kept else {}
            self.after_resume()

    def train(self) -> None:
        with Stop(self.acc) as signals:
            self._train(signals)

    def _train(self, signals: "Stop") -> None:
        cfg, acc, state = self.cfg, self.acc, self.state
        step, epoch = state["step"], state["epoch"]
        # the bar closes (ending its line) before any error is printed
        with tqdm(total=self.total_steps, initial=step, desc=self.name, unit="step",
                  disable=not acc.is_main_process) as bar:
            while step < self.total_steps:
                skip = state["batch_in_epoch"] if epoch == state["epoch"] else 0
                stop = min(self.batches_per_epoch, skip + (self.total_steps - step) * cfg.grad_accum)  # what is left
                sums: dict[str, float] = {}
                for batch_in_epoch, batch in enumerate(loader(self.batches(epoch, skip, stop), cfg.num_workers),
                                                       start=skip):
                    if "error" in batch:
                        raise PipelineError(batch["error"])
                    for k, v in self.micro_step(batch, step + 1).items():
                        sums[k] = sums.get(k, 0.0) + v
                    if not acc.sync_gradients:
                        continue
                    step += 1
                    self.log_step(step, epoch, sums, bar, self.validate(step))
                    sums = {}
                    done_epoch = batch_in_epoch + 1 == self.batches_per_epoch
                    stopping = signals.requested()
                    if step % cfg.save_every == 0 or step == self.total_steps or stopping:
                        self.checkpoint(step, epoch + done_epoch, 0 if done_epoch else batch_in_epoch + 1)
                    if stopping:
                        bar.close()
                        self.log(f"[{self.name}] {stopping}: saved a checkpoint at step {step}")
                        raise KeyboardInterrupt
                    faults.at("step", step)
                epoch += 1
        self.state.update(step=step, epoch=epoch, batch_in_epoch=0)

    def log_step(self, step: int, epoch: int, sums: dict[str, float], bar: Any, extra: dict[str, float]) -> None:
        self.scheduler.step()
        row = {"step": step, "epoch": epoch, **{k: mean_over_processes(self.acc, v) for k, v in sums.items()},
               "lr": self.scheduler.get_last_lr()[0], **self.logged(), **extra}
        for k in self.COUNTS:  # counts: summed over processes, not averaged
            if k in row:
                row[k] = int(round(row[k] * self.acc.num_processes))
        row.update(self.derived(row))
        if self.cfg.report_to:
            self.acc.log({k: v for k, v in row.items() if k != "step"}, step=step)
        if self.acc.is_main_process:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.last_row = row
            bar.set_postfix(self.postfix(row))
            bar.update(1)

    def logged(self) -> dict[str, float]:
        """Values of the model itself logged every step (distill: the logit scale)."""
        return {}

    def derived(self, row: dict) -> dict[str, float]:
        """Values computed from the step's summed ones (distill: the share of list entries in-batch)."""
        return {}

    def checkpoint(self, step: int, epoch: int, batch_in_epoch: int) -> None:
        """save_state, then trainer_state.json, then latest.json: a checkpoint counts once latest.json names it."""
        acc, out = self.acc, self.out
        ckpt = out / "checkpoints" / f"step-{step}"
        try:
            acc.save_state(str(ckpt))
        except RuntimeError as e:   # torch's writer reports a full disk as "[enforce fail at inline_container.cc]"
            free = shutil.disk_usage(out).free
            raise PipelineError(f"{ckpt}: the checkpoint could not be written ({free // 2**20} MiB free on that disk: "
                                f"{str(e).splitlines()[0][:120]}); free some space and rerun to resume from the last "
                                "complete checkpoint") from None
        acc.wait_for_everyone()   # every rank's files are written before they are hashed
        if acc.is_main_process:
            files = {f.name: sha256_file(f) for f in sorted(ckpt.iterdir()) if f.is_file()}
            atomic_write_json(ckpt / "trainer_state.json", {"step": step, "epoch": epoch,
                                                            "batch_in_epoch": batch_in_epoch, **self.extra_state(),
                                                            "scheduler": self.scheduler.state_dict(), "files": files})
            previous = read_json(out / LATEST)
            atomic_write_json(out / LATEST, {"dir": ckpt.name, "step": step})
            if previous and previous["dir"] != ckpt.name:  # keep only the newest complete checkpoint
                shutil.rmtree(out / "checkpoints" / previous["dir"], ignore_errors=True)
        acc.wait_for_everyone()

    def finish_outputs(self, writer: Any, folders: tuple[str, ...], extra: Optional[dict] = None) -> None:
        """Record the saved model folders' files and metrics.jsonl (main process), then finish the stage."""
        def files() -> list[str]:
            return [f"{d}/{f.name}" for d in folders if (self.out / d).exists()
                    for f in sorted((self.out / d).iterdir())] + ["metrics.jsonl"]

        if self.acc.is_main_process:
            for rel in files():
                writer.record_file(rel)
        self.acc.wait_for_everyone()
        writer.finish(files(), extra={"steps": self.state["step"], "final": "final", **(extra or {})})


def accelerator(cfg: Any, out: Path) -> tuple[Any, Any, Any]:
    """(Accelerator, Dist, log) of a training stage: its mixed precision, accumulation, device and trackers."""
    from accelerate import Accelerator

    from .dist import Dist
    from .log import make_log

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
        return Growth(keys=("max_steps", "epochs"), steps=self.total_steps, checkpoints=LATEST, outputs=("final",))


def run_loop(setup: Any, writer: Any, acc: Any, report_to: Optional[str]) -> None:
    """setup() -> a StepLoop with a finish(writer); resume, train, finish; an error aborts the writer."""
    try:
        with writer:
            loop = setup()
            loop.resume()
            loop.train()
            loop.finish(writer)
    finally:
        if report_to:
            acc.end_training()


def check_training(cfg: Any) -> None:
    """What every training stage checks of `TrainingOptions`/`TrainingRuntime` beyond their declared ranges: one
    of --max-steps and --epochs at most, and a mixed precision this machine can run."""
    if cfg.max_steps is not None and cfg.epochs is not None:
        raise PipelineError("give --max-steps or --epochs, not both")
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if cfg.mixed_precision == "fp16" and on_cpu:
        # Accelerate runs fp16 on a CPU without autocast or a loss scaler: it would silently train in fp32
        raise PipelineError("--mixed-precision fp16 needs a GPU; on the CPU use --mixed-precision bf16 (or no)")


def verified(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's trainer state, after checking every file against the SHA-256 recorded when it was written."""
    state = read_json(ckpt / "trainer_state.json")
    if state is None:
        raise PipelineError(f"{ckpt}: trainer_state.json is missing (the checkpoint is damaged); remove "
                            f"{ckpt.parent} to train from the start")
    for name, digest in (state.get("files") or {}).items():
        path = ckpt / name
        if not path.exists() or sha256_file(path) != digest:
            raise PipelineError(f"{path}: {'missing' if not path.exists() else 'damaged'} (its SHA-256 differs from "
                                f"the one recorded when the checkpoint was written); remove {ckpt.parent} to train "
                                "from the start")
    return state


def finite(acc: Any, optimizer: Any, ckpt: Path) -> None:
    """Refuse to resume from weights or optimizer moments that are not finite."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            tensors = [p.data] + [v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                raise PipelineError(f"{ckpt}: the checkpoint holds non-finite weights or optimizer state; remove "
                                    f"{ckpt.parent} to train from the start")


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
            flag = bool(self.acc.reduce(torch.tensor(int(flag), device=self.acc.device), reduction="sum") > 0)
        return (signal.Signals(self.signal).name if self.signal else "a signal to another process") if flag else None

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def mean_over_processes(acc: Any, value: float) -> float:
    if acc.num_processes == 1:
        return value
    return float(acc.reduce(torch.tensor(value, device=acc.device), reduction="mean"))


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
