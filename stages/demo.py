"""`cprd-pipeline demo`: the whole pipeline on the bundled demo, ending in a table a researcher can trust.

1. generate the demo corpus (train and test splits) from data/demo.yaml
2. unpack the demo's own student (tiny CLIP) and teacher (tiny BLIP ITM) from data/demo/
3. mine -> score-teacher (BLIP's ITM + ITC score) -> evaluate the student and the teacher re-rank on test;
   the teacher must beat the student there, or the demo says so and stops
4. distill one student per method (--loss none | kl | cprd) and seed from the same teacher cache, plus a
   CPRD run on a cache of the ITM score alone (where the gain comes from), and evaluate each
5. report.md, report.json and report.png (score distributions, RSUM per method) under --out

Every step is the ordinary stage with the artifact contract, so a second `make demo` re-uses what is done.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from pipeline.artifacts import atomic_write_json, read_json
from pipeline.config import option, resolve, runtime
from pipeline.errors import PipelineError
from pipeline.log import make_log

REPO = Path(__file__).resolve().parents[1]
KS = (1, 5, 10)


@dataclass
class DemoConfig:
    out: str = runtime("runs/demo", "output folder (runs, models, data and the report)")
    seed: int = option(0, "first distillation seed (seeds seed, seed+1, ... as the recipe asks)")
    quick: bool = option(False, "a small, fast version of the same pipeline (for tests)")
    allow_weak_teacher: bool = option(False, "distil even if the teacher does not beat the student (reported "
                                             "in the table; for studying a teacher, not for results)")
    recipe: str = runtime(str(REPO / "data" / "demo.yaml"), "the demo recipe")
    force: bool = runtime(False, "replace outputs of an earlier demo made with other settings (after editing the "
                                 "recipe); what is up to date is still re-used")
    device: str = runtime("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))


def _stage(module, cls_name: str, **values):
    cls = getattr(module, cls_name)
    return module.run(resolve(cls, None, values))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _prepare_data(recipe: dict, quick: bool, out: Path, log) -> dict[str, Path]:
    from pipeline.demo.corpus import DemoCorpusSpec, generate

    c = recipe["corpus"]
    spec = DemoCorpusSpec(seed=c["seed"], held_out=c["held_out"],
                          train_images=recipe["quick"]["train_images"] if quick else c["train_images"])
    marker = out / "data" / "spec.json"
    paths = {s: out / "data" / f"{s}.json" for s in ("train", "test")}
    if read_json(marker) != spec.__dict__ or not all(p.exists() for p in paths.values()):
        log(f"[demo] generating the corpus: {spec}")
        generate(spec, out / "data")
        atomic_write_json(marker, spec.__dict__)
    return paths


def _prepare_models(assets: Path, out: Path, log) -> tuple[Path, Path, dict]:
    from pipeline.demo.models import unpack

    if not (assets / "student.safetensors").exists():
        raise PipelineError(f"{assets}: no demo models (student.safetensors, teacher.safetensors); "
                            "build them with `make demo-assets`")
    for kind in ("student", "teacher"):
        asset, folder = assets / f"{kind}.safetensors", out / "models" / kind
        marker = folder / "asset.sha256"
        if not marker.exists() or marker.read_text() != _digest(asset):
            log(f"[demo] unpacking {asset}")
            unpack(asset, folder)
            marker.write_text(_digest(asset))
    return out / "models" / "student", out / "models" / "teacher", json.loads((assets / "assets.json").read_text())


def _link_mine(run: Path, shared: Path) -> None:
    """A second run directory that re-uses the first run's mine output (read-only)."""
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "mine").exists():
        (run / "mine").symlink_to(shared.resolve() / "mine", target_is_directory=True)


def run(cfg: DemoConfig) -> dict:
    from stages import distill, evaluate, mine, score_teacher

    log = make_log(True)
    t_start = time.time()
    recipe = yaml.safe_load(Path(cfg.recipe).read_text())
    out = Path(cfg.out)
    assets = Path(recipe["assets"]) if Path(recipe["assets"]).is_absolute() else REPO / recipe["assets"]
    data = _prepare_data(recipe, cfg.quick, out, log)
    student, teacher, meta = _prepare_models(assets, out, log)
    w = float(meta["itc_weight"])
    dev = dict(device=cfg.device, force=cfg.force)

    # stage one: mine and score (two teacher caches: the combined score, and ITM alone)
    run_main, run_itm = out / "run", out / "run-itm"
    _stage(mine, "MineConfig", run=str(run_main), data=str(data["train"]), student=str(student),
           k=recipe["mine"]["k"], **dev)
    _stage(score_teacher, "TeacherConfig", run=str(run_main), teacher=str(teacher), score="itm+itc", itc_weight=w, **dev)
    _link_mine(run_itm, run_main)
    _stage(score_teacher, "TeacherConfig", run=str(run_itm), teacher=str(teacher), score="itm", **dev)

    def evaluate_model(model: Path, name: str, **kw) -> dict:
        return _stage(evaluate, "EvalConfig", data=str(data["test"]), model=str(model), out=str(out / "eval" / name),
                      device=cfg.device, **kw)

    # the teacher must beat the student before distilling means anything
    base = evaluate_model(student, "student", rerank_teacher=str(teacher), rerank_score="itm+itc", itc_weight=w)
    itm_rerank = evaluate_model(student, "student-itm", rerank_teacher=str(teacher), rerank_score="itm")["rerank"]
    weak = base["rerank"]["rsum"] <= base["rsum"]
    if weak and cfg.allow_weak_teacher:
        log(f"[demo] WARNING: the teacher does not beat the student (re-rank RSUM {base['rerank']['rsum']:.1f} vs "
            f"{base['rsum']:.1f}); continuing because of --allow-weak-teacher")
    elif weak:
        raise PipelineError(f"the demo teacher does not beat the student on the test split (re-rank RSUM "
                            f"{base['rerank']['rsum']:.1f} vs student {base['rsum']:.1f}); distilling it would "
                            "teach nothing. Rebuild the assets with `make demo-assets` (longer teacher training)")
    else:
        log(f"[demo] teacher re-rank RSUM {base['rerank']['rsum']:.1f} > student {base['rsum']:.1f}: distilling")

    # stage two: one student per method and seed, all from the same teacher cache
    d = dict(recipe["distill"])
    if cfg.quick:
        d.pop("epochs", None)
        d["max_steps"] = recipe["quick"]["max_steps"]
    seeds = [cfg.seed + i for i in range(int(recipe["seeds"]))]
    plan = [(m, run_main, f"loss={m}") for m in recipe["methods"]] + [("cprd", run_itm, "loss=cprd, ITM-only teacher")]
    results: dict[str, list[dict]] = {}
    for loss, run_dir, label in plan:
        for s in seeds:
            name = f"{loss}{'-itm' if run_dir == run_itm else ''}-s{s}"
            target = out / "students" / name
            _stage(distill, "DistillConfig", run=str(run_dir), out=str(target), student=str(student), loss=loss,
                   seed=s, save_every=10**6, **d, **dev)
            results.setdefault(label, []).append(evaluate_model(target / "final", name))

    rows = [("student (before distillation)", [base], "-"),
            ("teacher re-rank, ITM + ITC (top 16)", [base["rerank"]], "-"),
            ("teacher re-rank, ITM only (top 16)", [itm_rerank], "-")]
    rows += [(label, ms, str(len(ms))) for label, ms in results.items()]
    meta = {**meta, "student": _describe(student), "teacher": _describe(teacher)}
    report = _report(rows, meta, recipe, cfg, time.time() - t_start)
    (out / "report.md").write_text(report)
    atomic_write_json(out / "report.json", {label: ms for label, ms, _ in rows})
    _plot(out, run_main, rows)
    log("\n" + report)
    return {label: ms for label, ms, _ in rows}


def _describe(model: Path) -> str:
    """'2 layers, width 64' from a saved model's config (its text tower; the vision tower matches)."""
    text = json.loads((model / "config.json").read_text())["text_config"]
    return f"{text['num_hidden_layers']} layers, width {text['hidden_size']}"


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def _report(rows, meta: dict, recipe: dict, cfg: DemoConfig, seconds: float) -> str:
    train_images = recipe["quick" if cfg.quick else "corpus"]["train_images"]
    length = (f"{recipe['quick']['max_steps']} steps" if cfg.quick
              else f"{recipe['distill'].get('epochs', 1)} epoch(s)")
    head = ("| method | seeds | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | RSUM |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    body = ""
    for label, ms, n in rows:
        cells = [_cell([m[d][f"R@{k}"] for m in ms]) for d in ("i2t", "t2i") for k in KS]
        body += f"| {label} | {n} | " + " | ".join(cells) + f" | {_cell([m['rsum'] for m in ms])} |\n"
    notes = []
    if cfg.quick:
        notes.append("**Quick mode**: a small corpus and a few steps; the numbers only show that every path runs.")
    if rows[1][1][0]["rsum"] <= rows[0][1][0]["rsum"]:
        notes.append("**The teacher does not beat the student here** (--allow-weak-teacher): distilling it is not "
                     "expected to help.")
    return (
        "# cprd-pipeline demo\n\n" + "".join(n + "\n\n" for n in notes) +
        "Test split: one image of each of the 264 shape combinations (40 never seen in training), 5 captions "
        "each; Recall@K in percent, mean ± standard deviation over seeds. The student is the demo's tiny CLIP "
        f"({meta['student']}, pre-trained on {meta['student_images']:,} images), the teacher its tiny BLIP "
        f"({meta['teacher']} per tower, on {meta['teacher_images']:,} images), scored as ITM log-odds + "
        f"{meta['itc_weight']:g} x ITC cosine (the weight chosen on a separate validation split). Distilled "
        f"students start from the same student and train {length} on the "
        f"teacher cache of the train split ({train_images:,} images, top-{recipe['mine']['k']} mined negatives per "
        f"query) with itc + {recipe['distill']['distill_weight']} x the distillation loss.\n\n"
        + head + body +
        f"\nTotal time {seconds / 60:.1f} min. Plot: report.png. Raw numbers: report.json and eval/*/metrics.json.\n"
    )


def _plot(out: Path, run_main: Path, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    shards = sorted((run_main / "teacher").glob("part-*.parquet"))
    t = pq.read_table(shards[0]) if shards else None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    if t is not None:
        teacher = np.concatenate(t["teacher_scores"].to_numpy(zero_copy_only=False))
        student = np.concatenate(t["student_scores"].to_numpy(zero_copy_only=False))
        z = lambda x: (x - x.mean()) / (x.std() + 1e-9)
        axes[0].hist(z(teacher), bins=60, alpha=0.6, label="teacher (ITM+ITC)", density=True)
        axes[0].hist(z(student), bins=60, alpha=0.6, label="student (cosine)", density=True)
        axes[0].set_title("hard-negative scores, z-scored")
        axes[0].legend()
    labels = [label for label, _, _ in rows]
    means = [np.mean([m["rsum"] for m in ms]) for _, ms, _ in rows]
    errs = [np.std([m["rsum"] for m in ms]) for _, ms, _ in rows]
    axes[1].barh(range(len(labels)), means, xerr=errs, color="tab:blue")
    axes[1].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[1].set_xlim(min(means) - 20, max(means) + 10)
    axes[1].invert_yaxis()
    axes[1].set_title("test RSUM (higher is better)")
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)
    plt.close(fig)
