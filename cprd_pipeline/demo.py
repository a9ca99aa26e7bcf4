"""`cprd-pipeline demo`: the whole pipeline on the bundled demo, ending in a table a researcher can trust.

1. generate the demo corpus (train split and the evaluation galleries) from the recipe (data/demo.yaml: the
   teacher's knowledge reaching the student with budgeted lists, KL's 2 per query by teacher-rank-steep and the
   CPRD row's distill's default; data/demo-transfer.yaml: the same with
   the whole lists; data/demo-tour.yaml: every row on the tiny student), read as a typed
   `Recipe` (cprd_pipeline/demo_recipe.py) after `--quick` and `--corpus-seed` (`Recipe.for_run`)
2. unpack the recipe's student (tiny CLIP) and teacher (tiny BLIP) from its assets folder
3. mine -> score-teacher (BLIP's ITM + ITC score) -> evaluate the student and the teacher re-rank;
   the teacher must beat the student there, or the demo says so and stops
4. distill one student per recipe method and seed from the same teacher cache (a method may learn from a cache
   of the ITM score alone instead), and evaluate each
5. with --full, LoopITR's two halves through the loop (cprd_pipeline/rounds.py), per seed: a second round from
   each round-1 student, and a round with the teacher fine-tuned on the student's negatives
6. report.md and report.json (the comparison table, cprd_pipeline/demo_report.py), and report/index.html: the
   run report (pipeline/report/) of everything under --out, with the table first

Every step is the ordinary stage with the artifact contract, so a second `make demo` re-uses what is done.

OUT/
  data/ models/          the corpus (spec.json: the splits made with its spec) and the unpacked models
  run/                   mine, teacher (the ITM + ITC cache), teacher-train (--full)
  run-itm/               mine (a link to run/mine), teacher (the ITM cache, if a method learns from it)
  students/NAME-sSEED/   one distilled student per method and seed
  loop/NAME-sSEED/       --full, round 2: the loop's pipeline.yaml; round-1/ links to run/ and the round-1
                         student, round-2/ is the loop's own (mine, teacher, distill)
  loop-ft/NAME-sSEED/    --full, the fine-tuned teacher: round-1/ links mine to run/mine, teacher-train to
                         run/teacher-train and teacher to run-ft/teacher (shared by the seeds); distill its own
  eval/SPLIT/MODEL/GALLERY/   every evaluation
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import yaml

from pipeline.artifacts import atomic_write_json, read_json
from pipeline.config import option, runtime
from pipeline.demo.corpus import DemoCorpusSpec
from pipeline.errors import PipelineError
from pipeline.log import make_log
from stages import stage

from .demo_recipe import Corpus, Method, Recipe
from .demo_report import STUDENT, TEACHER, Row, Setting, report

REPO = Path(__file__).resolve().parents[1]  # the recipe and packed models ship in the repository
SAVE_NEVER = 10**6                          # save_every: no checkpoints but the final model


@dataclass
class DemoConfig:
    out: str = runtime("runs/demo", "output folder (runs, models, data and the report)")
    seed: int = option(0, "first distillation seed (seeds seed, seed+1, ... as the recipe asks)", at_least=0)
    quick: bool = option(False, "a small, fast version of the same pipeline (for tests)")
    full: bool = option(False, "also LoopITR's two halves: a second round (re-mined with the distilled students) and "
                               "a teacher fine-tuned on the student's negatives (about 10 more minutes on 2 cores)")
    allow_weak_teacher: bool = option(False, "distil even if the teacher does not beat the student (reported "
                                             "in the table; for studying a teacher, not for results)")
    recipe: str = runtime(str(REPO / "data" / "demo.yaml"), "the demo recipe")
    methods: str = runtime("", "comma-separated names of the recipe's methods to run (default: all); the "
                               "recipe's baseline always runs, as every row is compared with it")
    split: str = option("test", "where to evaluate: test (the report) or val (for choosing settings)",
                        choices=("test", "val"))
    corpus_seed: Optional[int] = option(None, "generate the corpus with this seed instead of the recipe's (the same "
                                              "recipe on another corpus)", at_least=0)
    force: bool = runtime(False, "replace outputs of an earlier demo made with other settings (after editing the "
                                 "recipe); what is up to date is still re-used")
    device: str = runtime("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))


def _in_repo(path: str) -> Path:
    """A path from a recipe or assets.json: absolute as given, else relative to the repository."""
    return Path(path) if Path(path).is_absolute() else REPO / path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def corpus_spec(corpus: Corpus) -> DemoCorpusSpec:
    """The generator's spec of a recipe's corpus (the spec's other fields are the demo assets')."""
    return DemoCorpusSpec(seed=corpus.seed, held_out=corpus.held_out, train_images=corpus.train_images)


def _prepare_data(corpus: Corpus, split: str, out: Path, log) -> tuple[Path, list[Path]]:
    """(train annotation file, evaluation galleries of `split`), each split generated once per corpus spec.

    spec.json lists the splits made with its spec (written after them): a val run and a test run in one folder
    share the train split, and with it mine, the teacher cache and the students; another spec starts over."""
    from pipeline.demo.corpus import generate

    spec = corpus_spec(corpus)
    galleries = [split] + [f"{split}-{g}" for g in range(1, corpus.galleries)]
    marker = out / "data" / "spec.json"
    paths = {s: out / "data" / f"{s}.json" for s in ["train"] + galleries}
    have = read_json(marker) or {}
    made = set(have.get("splits", [])) if all(have.get(k) == v for k, v in spec.__dict__.items()) else set()
    missing = [s for s, p in paths.items() if s not in made or not p.exists()]
    if missing:
        log(f"[demo] generating the corpus: {spec}, splits {', '.join(missing)}")
        generate(spec, out / "data", splits=tuple(missing))
        atomic_write_json(marker, {**spec.__dict__, "splits": sorted(made | set(paths))})
    return paths["train"], [paths[g] for g in galleries]


def _prepare_models(assets: Path, out: Path, log) -> tuple[Path, Path, dict]:
    """Unpack the student and teacher of an assets folder (once per packed file) under OUT/models.

    A folder may hold only a student: its assets.json's `teacher_from` then names the folder whose teacher it
    was built against (relative to the repository), so one teacher file serves several students."""
    from pipeline.demo.models import unpack

    meta_file = assets / "assets.json"
    if not (assets / "student.safetensors").exists() or not meta_file.exists():
        raise PipelineError(f"{assets}: no demo models (student.safetensors, assets.json); "
                            "build them with `make demo-assets`")
    meta = json.loads(meta_file.read_text())
    packed = {"student": assets / "student.safetensors", "teacher": assets / "teacher.safetensors"}
    if not packed["teacher"].exists():
        if not meta.get("teacher_from"):
            raise PipelineError(f"{meta_file}: no teacher.safetensors beside it and no `teacher_from` naming the "
                                "assets folder that holds its teacher")
        packed["teacher"] = _in_repo(meta["teacher_from"]) / "teacher.safetensors"
        if not packed["teacher"].exists():
            raise PipelineError(f"{meta_file}: teacher_from {meta['teacher_from']!r} holds no teacher.safetensors")
    for kind, asset in packed.items():
        folder = out / "models" / kind
        marker, digest = folder / "asset.sha256", _digest(asset)
        if not marker.exists() or marker.read_text() != digest:
            log(f"[demo] unpacking {asset}")
            unpack(asset, folder)
            marker.write_text(digest)
    return out / "models" / "student", out / "models" / "teacher", meta


def _link(folder: Path, targets: dict[str, Path]) -> None:
    """FOLDER/NAME -> target for each (a relative link, so OUT can move), each target made if missing: stage outputs
    that a loop round re-uses (they are up to date there) or shares (made once, through the first link)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in targets.items():
        link = folder / name
        target.mkdir(parents=True, exist_ok=True)
        relative = os.path.relpath(target, folder)
        if link.is_symlink() and os.readlink(link) != relative:
            link.unlink()        # a link of an earlier demo to another place
        elif link.exists() and not link.is_symlink():
            raise PipelineError(f"{link} is a folder where the demo links {target}; remove it")
        if not link.is_symlink():
            link.symlink_to(relative, target_is_directory=True)


@dataclass
class Demo:
    """One demo run: the recipe as run, the corpus, the models, and the steps that share them."""
    cfg: DemoConfig
    recipe: Recipe
    out: Path
    train: Path
    galleries: list[Path]
    student: Path
    teacher: Path
    itc_weight: float
    log: Callable[..., None]

    @property
    def dev(self) -> dict[str, Any]:
        return dict(device=self.cfg.device, replace=self.cfg.force)

    @property
    def seeds(self) -> list[int]:
        return [self.cfg.seed + i for i in range(self.recipe.seeds)]

    @property
    def k_test(self) -> int:
        return self.recipe.evaluate.k_test

    @property
    def run_main(self) -> Path:
        return self.out / "run"

    def caches(self) -> dict[str, Path]:
        """The run whose teacher cache a method learns from, by the method's `cache`."""
        return {"itm+itc": self.run_main, "itm": self.out / "run-itm"}

    def stage_one(self) -> None:
        """Mine and score (the recipe's score; a cache of ITM alone if a method learns from it)."""
        mine = self.recipe.mine
        easy = {k: v for k, v in (("easy", mine.easy), ("easy_from", mine.easy_from)) if v is not None}
        stage("mine").run(run=str(self.run_main), data=str(self.train), student=str(self.student), k=mine.k,
                          **easy, **self.dev)
        stage("score-teacher").run(run=str(self.run_main), teacher=str(self.teacher), score=self.recipe.teacher.score,
                                   itc_weight=self.itc_weight, **self.dev)
        if any(m.cache == "itm" for m in self.recipe.methods):
            run_itm = self.caches()["itm"]
            _link(run_itm, {"mine": self.run_main / "mine"})
            stage("score-teacher").run(run=str(run_itm), teacher=str(self.teacher), score="itm", **self.dev)

    def evaluate(self, model: Path, name: str, score: Optional[str] = None, teacher_on: Optional[int] = None,
                 by: Optional[Path] = None) -> dict:
        """The model on every gallery, the teacher (`by`, default the recipe's) re-ranking its top k_test on the
        first `teacher_on` (default: the recipe's teacher_galleries) for the re-rank row and rank agreement; each
        number averaged over the galleries that have it."""
        teacher_on = teacher_on or self.recipe.evaluate.teacher_galleries or len(self.galleries)
        per = []
        for i, g in enumerate(self.galleries):
            rerank = dict(rerank_teacher=str(by or self.teacher), rerank_score=score or self.recipe.teacher.score,
                          itc_weight=self.itc_weight, teacher_cache=str(self.out / "teacher-scores")) \
                if i < teacher_on else {}
            done = stage("evaluate").run(data=str(g), model=str(model), k_test=self.k_test, **self.dev,
                                         out=str(self.out / "eval" / self.cfg.split / name / g.stem), **rerank)
            per.append(read_json(done / "metrics.json"))
        return {**_mean_metrics(per), "rsum_per_gallery": [m["rsum"] for m in per]}

    def check_teacher(self) -> list[Row]:
        """The student and the teacher re-ranks: the teacher must beat the student before distilling means
        anything (or --allow-weak-teacher says to go on)."""
        reference = self.recipe.evaluate.reference_on(len(self.galleries))
        base = self.evaluate(self.student, "student", teacher_on=reference)
        itm = self.evaluate(self.student, "student-itm", score="itm")["rerank"]  # a reference row: fewer galleries
        teacher, student = base["rerank"]["rsum"], base["rsum"]
        if teacher <= student and self.cfg.allow_weak_teacher:
            self.log(f"[demo] WARNING: the teacher does not beat the student (re-rank RSUM {teacher:.1f} vs "
                     f"{student:.1f}); continuing because of --allow-weak-teacher")
        elif teacher <= student:
            raise PipelineError(f"the demo teacher does not beat the student on the {self.cfg.split} split (re-rank "
                                f"RSUM {teacher:.1f} vs student {student:.1f}); distilling it would teach nothing. "
                                "Rebuild the assets with `make demo-assets` (longer teacher training)")
        else:
            self.log(f"[demo] teacher re-rank RSUM {teacher:.1f} > student {student:.1f}: distilling")
        shown = self.recipe.evaluate.teacher_galleries or len(self.galleries)
        some = lambda n: ")" if n >= len(self.galleries) else f", {n} of the galleries)"
        return [Row(STUDENT, "student (before distillation)", [base], seeded=False),
                Row(TEACHER, f"teacher re-rank, ITM + ITC (top {self.k_test}" + some(reference), [base["rerank"]],
                    seeded=False),
                Row("teacher-itm", f"teacher re-rank, ITM only (top {self.k_test}" + some(shown), [itm], seeded=False)]

    def distilled(self, folder: Path, name: str) -> dict:
        """A distilled student's metrics (evaluated as eval/SPLIT/NAME) and its training counts."""
        return {**self.evaluate(folder / "final", name), **_false_negatives(folder)}

    def students(self, method: Method) -> Row:
        """One distilled student per seed, from the recipe's student on the method's teacher cache."""
        runs = []
        for s in self.seeds:
            target = self.out / "students" / f"{method.name}-s{s}"
            stage("distill").run(run=str(self.caches()[method.cache]), out=str(target), student=str(self.student),
                                 seed=s, save_every=SAVE_NEVER, **{**self.recipe.distill, **method.options},
                                 **self.dev)
            runs.append(self.distilled(target, f"{method.name}-s{s}"))
        return Row(method.name, method.label, runs)

    def plan(self, method: Method, seed: int) -> dict[str, Any]:
        """The loop's pipeline file for one seed of a method: round 1 is the demo's (mine and score-teacher of
        run/, and the method's student of that seed)."""
        return {"device": self.cfg.device,
                "mine": {"data": str(self.train), "student": str(self.student), "k": self.recipe.mine.k},
                "score-teacher": {"teacher": str(self.teacher), "score": self.recipe.teacher.score,
                                  "itc_weight": self.itc_weight},
                "distill": {**self.recipe.distill, **method.options, "seed": seed, "save_every": SAVE_NEVER}}

    def loop(self, root: Path, plan: dict[str, Any], rounds: int) -> None:
        """`cprd-pipeline loop` on ROOT with the plan (written to ROOT/pipeline.yaml), --force passed on."""
        from .rounds import LoopConfig, run as run_loop

        root.mkdir(parents=True, exist_ok=True)
        (root / "pipeline.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
        run_loop(LoopConfig(run=str(root), rounds=rounds, pipeline=str(root / "pipeline.yaml"),
                            device=self.cfg.device, force=self.cfg.force))

    def round_two(self, method: Method) -> Row:
        """Per seed, a loop of two rounds whose round 1 is the demo's (linked, so up to date): round 2 re-mines
        with the round-1 student, scores with the same teacher and distils on from that student."""
        runs = []
        for s in self.seeds:
            root = self.out / "loop" / f"{method.name}-s{s}"
            _link(root / "round-1", {"mine": self.run_main / "mine", "teacher": self.run_main / "teacher",
                                     "distill": self.out / "students" / f"{method.name}-s{s}"})
            self.loop(root, self.plan(method, s), rounds=2)
            runs.append(self.distilled(root / "round-2" / "distill", f"{method.name}-round2-s{s}"))
        return Row(f"{method.name}-round2", f"round 2: {method.label}, re-mined with its round-1 student", runs)

    def tuned_teacher(self, method: Method, train_teacher: dict[str, Any]) -> list[Row]:
        """Per seed, a one-round loop with train-teacher: the teacher fine-tuned on the round-1 mined negatives
        (run/teacher-train) and its cache (run-ft/teacher), both made once through the first seed's links, then
        a student distilled on that cache. Rows: the fine-tuned teacher's re-rank, the students."""
        runs = []
        for s in self.seeds:
            root = self.out / "loop-ft" / f"{method.name}-s{s}"
            _link(root / "round-1", {"mine": self.run_main / "mine", "teacher-train": self.run_main / "teacher-train",
                                     "teacher": self.out / "run-ft" / "teacher"})
            plan = {**self.plan(method, s), "train-teacher": {**train_teacher, "save_every": SAVE_NEVER}}
            self.loop(root, plan, rounds=1)
            runs.append(self.distilled(root / "round-1" / "distill", f"{method.name}-ft-s{s}"))
        tuned = self.run_main / "teacher-train" / "final"
        rerank = self.evaluate(self.student, "student-ft", by=tuned, teacher_on=len(self.galleries))["rerank"]
        return [Row("teacher-ft", f"teacher re-rank, fine-tuned on the student's negatives (top {self.k_test})",
                    [rerank], seeded=False),
                Row(f"{method.name}-ft", f"{method.label}, teacher fine-tuned on the student's negatives", runs)]


def run(cfg: DemoConfig) -> dict:
    log = make_log(True)
    t_start = time.time()
    recipe = Recipe.load(cfg.recipe).for_run(cfg.quick, cfg.corpus_seed)
    if cfg.full and recipe.full is None:
        raise PipelineError(f"--full: {cfg.recipe} has no `full:` block")
    keep = (recipe.full.method,) if cfg.full else ()
    methods = recipe.chosen(cfg.methods, cfg.recipe, keep=keep)
    out = Path(cfg.out)
    train, galleries = _prepare_data(recipe.corpus, cfg.split, out, log)
    student, teacher, meta = _prepare_models(_in_repo(recipe.assets), out, log)
    demo = Demo(cfg, recipe, out, train, galleries, student, teacher, float(meta["itc_weight"]), log)
    demo.stage_one()
    rows = demo.check_teacher() + [demo.students(m) for m in methods]
    if cfg.full:   # LoopITR's two halves, each once
        full = recipe.method(recipe.full.method)
        rows += [demo.round_two(full)] + demo.tuned_teacher(full, recipe.full.train_teacher)
    meta = {**meta, "student": _describe(student), "teacher": _describe(teacher)}
    setting = Setting(recipe, corpus_spec(recipe.corpus), cfg.split, len(galleries), meta, cfg.quick, cfg.full)
    _write_reports(rows, report(rows, setting, time.time() - t_start), out, log)
    return {r.label: r.runs for r in rows}


def _write_reports(rows: list[Row], table: str, out: Path, log: Callable[..., None]) -> None:
    """report.md, report.json, and the run report of everything under OUT with the table first."""
    from pipeline.report import Section, build, write

    (out / "report.md").write_text(table)
    atomic_write_json(out / "report.json", {r.label: r.runs for r in rows})
    section = Section("demo", "The demo's comparison of distillation methods", table.split("\n\n", 1)[1])
    write(build(out, extra=[section]), out / "report", "cprd-pipeline demo")
    log("\n" + table)


def _mean_metrics(per: list[dict]) -> dict:
    """The mean of every number in the metrics (recall, RSUM, agreement, re-rank) over the galleries that have it."""
    out: dict = {}
    for k, v in per[0].items():
        have = [p[k] for p in per if k in p]
        if isinstance(v, dict):
            out[k] = _mean_metrics(have)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(np.mean(have))
    return out


def _false_negatives(student_dir: Path) -> dict:
    """Per epoch, from metrics.jsonl: candidates dropped as false negatives (or by margin), the images and captions
    the student encoded, and the share of list entries that were queries or positives of their own batch."""
    rows = [json.loads(l) for l in (student_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = max(1, len({r["epoch"] for r in rows}))
    total = lambda key: sum(r.get(key, 0) for r in rows)
    return {"false_negatives_per_epoch": total("false_negatives") / epochs,
            "dropped_by_margin_per_epoch": total("dropped_by_margin") / epochs,
            "images_encoded_per_epoch": total("images_encoded") / epochs,
            "texts_encoded_per_epoch": total("texts_encoded") / epochs,
            "in_batch_share": total("negatives_in_batch") / max(1, total("negatives"))}


def _describe(model: Path) -> str:
    """'2 layers, width 64' from a saved model's config (its text tower; the vision tower matches)."""
    text = json.loads((model / "config.json").read_text())["text_config"]
    return f"{text['num_hidden_layers']} layers, width {text['hidden_size']}"
