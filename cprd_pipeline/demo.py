"""`cprd-pipeline demo`: the whole pipeline on the bundled demo, ending in a table a researcher can trust.

1. generate the demo corpus (train split and the evaluation galleries) from the recipe (data/demo.yaml, or
   data/demo-transfer.yaml for the setting where the teacher's knowledge reaches the student)
2. unpack the recipe's student (tiny CLIP) and teacher (tiny BLIP) from its assets folder
3. mine -> score-teacher (BLIP's ITM + ITC score) -> evaluate the student and the teacher re-rank;
   the teacher must beat the student there, or the demo says so and stops
4. distill one student per recipe method and seed from the same teacher cache (a method may learn from a cache
   of the ITM score alone instead), and evaluate each
5. report.md and report.json (the comparison table), and report/index.html: the run report (pipeline/report/)
   of everything under --out, with the table first

Every step is the ordinary stage with the artifact contract, so a second `make demo` re-uses what is done.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import yaml

from pipeline.artifacts import atomic_write_json, read_json
from pipeline.config import option, runtime
from pipeline.errors import PipelineError
from pipeline.log import make_log
from stages import stage

REPO = Path(__file__).resolve().parents[1]  # the recipe and packed models ship in the repository
KS = (1, 5, 10)


@dataclass
class DemoConfig:
    out: str = runtime("runs/demo", "output folder (runs, models, data and the report)")
    seed: int = option(0, "first distillation seed (seeds seed, seed+1, ... as the recipe asks)", at_least=0)
    quick: bool = option(False, "a small, fast version of the same pipeline (for tests)")
    full: bool = option(False, "also LoopITR's two halves: a second round (re-mined with the distilled students) and "
                               "a teacher fine-tuned on the student's negatives (about 12 more minutes on 2 cores)")
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


def _prepare_data(recipe: dict, quick: bool, split: str, out: Path, log) -> tuple[Path, list[Path]]:
    """(train annotation file, evaluation galleries of `split`), each split generated once per corpus spec.

    spec.json lists the splits made with its spec (written after them): a val run and a test run in one folder
    share the train split, and with it mine, the teacher cache and the students; another spec starts over."""
    from pipeline.demo.corpus import DemoCorpusSpec, generate

    c = {**recipe["corpus"], **(recipe["quick"] if quick else {})}
    spec = DemoCorpusSpec(seed=c["seed"], held_out=c["held_out"], train_images=c["train_images"])
    galleries = [split] + [f"{split}-{g}" for g in range(1, int(c.get("galleries", 1)))]
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


def _link_mine(run: Path, shared: Path) -> None:
    """A second run directory that re-uses the first run's mine output (read-only)."""
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "mine").exists():
        (run / "mine").symlink_to(shared.resolve() / "mine", target_is_directory=True)


@dataclass
class Row:
    """One line of the report: a model (or a teacher re-rank) and its metrics, one dict per seed."""
    label: str
    runs: list[dict]
    seeded: bool = True
    name: str = ""   # the recipe's method name


def run(cfg: DemoConfig) -> dict:
    log = make_log(True)
    t_start = time.time()
    recipe = yaml.safe_load(Path(cfg.recipe).read_text())
    if cfg.corpus_seed is not None:
        recipe["corpus"]["seed"] = cfg.corpus_seed
    out = Path(cfg.out)
    assets = _in_repo(recipe["assets"])
    train, galleries = _prepare_data(recipe, cfg.quick, cfg.split, out, log)
    student, teacher, meta = _prepare_models(assets, out, log)
    w = float(meta["itc_weight"])
    dev = dict(device=cfg.device, replace=cfg.force)
    k_test = int(recipe.get("evaluate", {}).get("k_test", 16))
    teacher_galleries = int(recipe.get("evaluate", {}).get("teacher_galleries", len(galleries)))

    # stage one: mine and score (the combined score; a cache of ITM alone if a method learns from it)
    run_main, run_itm = out / "run", out / "run-itm"
    stage("mine").run(run=str(run_main), data=str(train), student=str(student), k=recipe["mine"]["k"], **dev)
    stage("score-teacher").run(run=str(run_main), teacher=str(teacher), score="itm+itc", itc_weight=w, **dev)
    if any(m.get("cache") == "itm" for m in recipe["methods"]):
        _link_mine(run_itm, run_main)
        stage("score-teacher").run(run=str(run_itm), teacher=str(teacher), score="itm", **dev)

    def evaluate_model(model: Path, name: str, score: str = "itm+itc", teacher_on: int = teacher_galleries,
                       by: Path = teacher) -> dict:
        """The model on every gallery, the teacher re-ranking its top k_test on the first `teacher_on` (for the
        re-rank row and rank agreement); each number averaged over the galleries that have it."""
        per = []
        for i, g in enumerate(galleries):
            rerank = dict(rerank_teacher=str(by), rerank_score=score, itc_weight=w,
                          teacher_cache=str(out / "teacher-scores")) if i < teacher_on else {}
            done = stage("evaluate").run(data=str(g), model=str(model), k_test=k_test, **dev,
                                         out=str(out / "eval" / cfg.split / name / g.stem), **rerank)
            per.append(read_json(done / "metrics.json"))
        return {**_mean_metrics(per), "rsum_per_gallery": [m["rsum"] for m in per]}

    # the teacher must beat the student before distilling means anything
    base = evaluate_model(student, "student", teacher_on=len(galleries))
    itm_rerank = evaluate_model(student, "student-itm", score="itm")["rerank"]  # a reference row: fewer galleries
    weak = base["rerank"]["rsum"] <= base["rsum"]
    if weak and cfg.allow_weak_teacher:
        log(f"[demo] WARNING: the teacher does not beat the student (re-rank RSUM {base['rerank']['rsum']:.1f} vs "
            f"{base['rsum']:.1f}); continuing because of --allow-weak-teacher")
    elif weak:
        raise PipelineError(f"the demo teacher does not beat the student on the {cfg.split} split (re-rank RSUM "
                            f"{base['rerank']['rsum']:.1f} vs student {base['rsum']:.1f}); distilling it would "
                            "teach nothing. Rebuild the assets with `make demo-assets` (longer teacher training)")
    else:
        log(f"[demo] teacher re-rank RSUM {base['rerank']['rsum']:.1f} > student {base['rsum']:.1f}: distilling")

    # stage two: one student per method and seed
    shared = dict(recipe["distill"])
    if cfg.quick:
        shared.pop("epochs", None)
        shared["max_steps"] = recipe["quick"]["max_steps"]
    n_seeds = int(recipe["quick"].get("seeds", recipe["seeds"]) if cfg.quick else recipe["seeds"])
    seeds = [cfg.seed + i for i in range(n_seeds)]
    caches = {"itm+itc": run_main, "itm": run_itm}
    rows = [Row("student (before distillation)", [base], seeded=False),
            Row(f"teacher re-rank, ITM + ITC (top {k_test})", [base["rerank"]], seeded=False),
            Row(f"teacher re-rank, ITM only (top {k_test}"
                + (")" if teacher_galleries >= len(galleries) else f", {teacher_galleries} of the galleries)"),
                [itm_rerank], seeded=False)]
    def students(name: str, label: str, cache: Callable[[int], Path], method: dict,
                 start: Callable[[int], Path] = lambda s: student) -> Row:
        """One distilled student per seed, from `start(seed)` on the teacher cache of run `cache(seed)`, each
        evaluated."""
        runs = []
        for s in seeds:
            target = out / "students" / f"{name}-s{s}"
            stage("distill").run(run=str(cache(s)), out=str(target), student=str(start(s)), seed=s,
                                 save_every=10**6, **{**shared, **method}, **dev)
            runs.append({**evaluate_model(target / "final", f"{name}-s{s}"), **_false_negatives(target)})
        return Row(label, runs, name=name)

    methods = {}
    for method in _chosen_methods(recipe, cfg.methods, cfg.recipe):
        method = dict(method)
        name, label, cache = method.pop("name"), method.pop("label"), method.pop("cache", "itm+itc")
        methods[name] = (label, method)
        rows.append(students(name, label, lambda s, c=caches[cache]: c, method))

    if cfg.full:  # LoopITR's two halves, each once
        full = recipe["full"]
        name, (label, method) = full["method"], methods[full["method"]]
        for s in seeds:   # round 2: re-mine with each round-1 student, score, distil on from it
            r2 = out / "round-2" / f"{name}-s{s}"
            stage("mine").run(run=str(r2), data=str(train), student=str(out / "students" / f"{name}-s{s}" / "final"),
                              k=recipe["mine"]["k"], **dev)
            stage("score-teacher").run(run=str(r2), teacher=str(teacher), score="itm+itc", itc_weight=w, **dev)
        rows.append(students(f"{name}-round2", f"round 2: {label}, re-mined with its round-1 student",
                             lambda s: out / "round-2" / f"{name}-s{s}", method,
                             start=lambda s: out / "students" / f"{name}-s{s}" / "final"))
        # the teacher fine-tuned on the student's mined negatives, then the same distillation from it
        tt = dict(full["train_teacher"])
        if cfg.quick:
            tt.pop("epochs", None)
            tt["max_steps"] = recipe["quick"]["max_steps"]
        stage("train-teacher").run(run=str(run_main), teacher=str(teacher), save_every=10**6, **tt, **dev)
        tuned, run_ft = run_main / "teacher-train" / "final", out / "run-ft"
        _link_mine(run_ft, run_main)
        stage("score-teacher").run(run=str(run_ft), teacher=str(tuned), score="itm+itc", itc_weight=w, **dev)
        rows.append(Row(f"teacher re-rank, fine-tuned on the student's negatives (top {k_test})",
                        [evaluate_model(student, "student-ft", by=tuned, teacher_on=len(galleries))["rerank"]],
                        seeded=False))
        rows.append(students(f"{name}-ft", f"{label}, teacher fine-tuned on the student's negatives",
                             lambda s: run_ft, method))

    meta = {**meta, "student": _describe(student), "teacher": _describe(teacher)}
    report = _report(rows, meta, recipe, cfg, len(galleries), time.time() - t_start)
    (out / "report.md").write_text(report)
    atomic_write_json(out / "report.json", {r.label: r.runs for r in rows})
    # the pictures: the run report of everything under OUT, with this table first
    from pipeline.report import Section, build, write

    table = Section("demo", "The demo's comparison of distillation methods", report.split("\n\n", 1)[1])
    write(build(out, extra=[table]), out / "report", "cprd-pipeline demo")
    log("\n" + report)
    return {r.label: r.runs for r in rows}


def _chosen_methods(recipe: dict, names: str, path: str) -> list[dict]:
    """The recipe's methods named in the comma-separated `names` (all when empty), in the recipe's order, with
    its baseline kept."""
    if not names.strip():
        return recipe["methods"]
    want = {n.strip() for n in names.split(",") if n.strip()}
    known = [m["name"] for m in recipe["methods"]]
    if unknown := sorted(want - set(known)):
        raise PipelineError(f"--methods: {', '.join(unknown)} not in {path} (its methods: {', '.join(known)})")
    return [m for m in recipe["methods"] if m["name"] in want or m["name"] == recipe.get("baseline")]


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


def _cell(values: list[float], digits: int = 1) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _tau(m: dict) -> float:
    """Kendall's tau with the teacher over the top k_test, mean of both directions."""
    return (m["agreement"]["i2t"]["kendall_tau"] + m["agreement"]["t2i"]["kendall_tau"]) / 2


def _versus(runs: list[dict], ref: list[dict]) -> str:
    """Mean RSUM difference to the reference rows and that difference in pooled standard deviations."""
    a, b = [m["rsum"] for m in runs], [m["rsum"] for m in ref]
    diff = np.mean(a) - np.mean(b)
    if len(a) < 2 or len(b) < 2:
        return f"{diff:+.1f}"
    pooled = np.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2)
    return f"{diff:+.1f} ({diff / pooled:+.1f} sd)" if pooled > 0 else f"{diff:+.1f}"


def _per_gallery(runs: list[dict], ref: list[dict]) -> str:
    """Each gallery's RSUM difference to the reference (both averaged over seeds), then their mean ± standard
    error over galleries: '+8.9 / +0.2 / +3.0 (+4.0 ± 2.6)'. The galleries are draws of images, so this error
    holds the part of the uncertainty that the seeds' pooled sd leaves out."""
    d = np.mean([m["rsum_per_gallery"] for m in runs], axis=0) - np.mean([m["rsum_per_gallery"] for m in ref], axis=0)
    return " / ".join(f"{x:+.1f}" for x in d) + f" ({d.mean():+.1f} ± {d.std(ddof=1) / np.sqrt(len(d)):.1f})"


def _report(rows: list[Row], meta: dict, recipe: dict, cfg: DemoConfig, n_galleries: int, seconds: float) -> str:
    c = {**recipe["corpus"], **(recipe["quick"] if cfg.quick else {})}
    length = (f"{recipe['quick']['max_steps']} steps" if cfg.quick
              else f"{recipe['distill'].get('epochs', 1)} epoch(s)")
    none = next((r for r in rows if r.seeded and r.name == recipe.get("baseline")), None)
    head = ("| method | seeds | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | RSUM | vs none | "
            "Kendall tau | false neg. / epoch | images encoded / epoch (lists in-batch) |\n" + "| --- " * 13 + "|\n")
    body = ""
    for r in rows:
        cells = [_cell([m[d][f"R@{k}"] for m in r.runs]) for d in ("i2t", "t2i") for k in KS]
        seeds = str(len(r.runs)) if r.seeded else "-"
        versus = _versus(r.runs, none.runs) if (none and r.seeded and r is not none) else ""
        tau = _cell([_tau(m) for m in r.runs], 3) if "agreement" in r.runs[0] else ""
        fn = f"{np.mean([m['false_negatives_per_epoch'] for m in r.runs]):,.0f}" if r.seeded else ""
        by_margin = np.mean([m.get("dropped_by_margin_per_epoch", 0) for m in r.runs]) if r.seeded else 0
        fn += f" + {by_margin:,.0f} by margin" if by_margin else ""
        encoded = (f"{np.mean([m['images_encoded_per_epoch'] for m in r.runs]):,.0f} "
                   f"({100 * np.mean([m['in_batch_share'] for m in r.runs]):.0f}%)"
                   if r.seeded and "images_encoded_per_epoch" in r.runs[0] else "")
        body += (f"| {r.label} | {seeds} | " + " | ".join(cells) + f" | {_cell([m['rsum'] for m in r.runs])} | "
                 f"{versus} | {tau} | {fn} | {encoded} |\n")
    notes = []
    if cfg.quick:
        notes.append("**Quick mode**: a small corpus and a few steps; the numbers only show that every path runs.")
    if rows[1].runs[0]["rsum"] <= rows[0].runs[0]["rsum"]:
        notes.append("**The teacher does not beat the student here** (--allow-weak-teacher): distilling it is not "
                     "expected to help.")
    if cfg.split == "val":
        notes.append("**Validation split**: for choosing settings; the README's table is the test split.")
    if cfg.full:
        notes.append("**--full**: `round 2` students start from their round-1 student (same seed) and train on "
                     "negatives that student mined, scored by the same teacher; the fine-tuned teacher was trained "
                     "on the round-1 student's mined negatives of the train split (settings in the recipe's `full` "
                     "block, set a priori).")
    others = [r for r in rows if r.seeded and r is not none]
    galleries = ""
    if none and others and n_galleries > 1:
        galleries = ("`vs none` on each gallery alone (mean over seeds), then mean ± standard error over the "
                     "galleries, which counts the draw of test images that the pooled sd over seeds does not: " +
                     "; ".join(f"{r.label} {_per_gallery(r.runs, none.runs)}" for r in others) + ".\n\n")
    best = max(others, key=lambda r: np.mean([m["rsum"] for m in r.runs]),
               default=None)
    gap = ""
    if none and best:
        teacher, base = rows[1].runs[0]["rsum"], np.mean([m["rsum"] for m in none.runs])
        share = (np.mean([m["rsum"] for m in best.runs]) - base) / (teacher - base) if teacher > base else float("nan")
        gap = (f"The best distilled student ({best.label}) closes {100 * share:.1f}% of the RSUM gap between "
               f"the baseline and the teacher re-rank" + (" (negative: it ends below the baseline)" if share < 0 else "")
               + ".\n\n")
    return (
        "# cprd-pipeline demo\n\n" + "".join(n + "\n\n" for n in notes) +
        f"Corpus seed {c['seed']}, split `{cfg.split}`: {n_galleries} galleries of one image per shape combination (264 each, 40 of them never "
        "seen in training, 5 captions per image), each evaluated alone; Recall@K in percent, averaged over the "
        "galleries, then mean ± sample standard deviation over seeds. The student is the demo's tiny CLIP "
        f"({meta['student']}, pre-trained on {meta['student_images']:,} images), the teacher its tiny BLIP "
        f"({meta['teacher']} per tower, on {meta['teacher_images']:,} images), scored as ITM log-odds + "
        f"{meta['itc_weight']:g} x ITC cosine (the weight chosen on a separate validation split). Distilled "
        f"students start from the same student and train {length} on the "
        f"teacher cache of the train split ({c['train_images']:,} images, top-{recipe['mine']['k']} mined negatives per "
        f"query) with itc + {recipe['distill']['distill_weight']} x the distillation loss (a method may override). "
        f"`vs none`: mean RSUM difference to the baseline `{recipe.get('baseline')}`, and in pooled standard deviations. `Kendall tau`: "
        "agreement of the student's order with the teacher's scores over each query's top "
        f"{recipe.get('evaluate', {}).get('k_test', 16)} (mean of both directions). `false neg.`: mined candidates "
        "dropped per epoch because they match the query (identical caption text, or the same image); `+ N by "
        "margin`: those a method's `max_teacher_margin` drops as well (the teacher scores them above the positive). "
        "`images encoded / epoch`: what the student's image tower encoded in training, the cost of its steps (a list "
        "entry outside its batch's pairs is encoded too, unless the lists are cut to the batch), and the share of "
        "list entries that were queries or positives of their own batch.\n\n"
        + head + body + "\n" + galleries + gap +
        f"Total time {seconds / 60:.1f} min. Pictures: report/index.html. Raw numbers: report.json and eval/*/metrics.json.\n"
    )
