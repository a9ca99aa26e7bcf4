"""One distillation epoch on the transfer demo's training data, per batching and list rule.

The data is `make demo-transfer`'s: the generated corpus (2,000 training images, 5 captions each: 12,000 query
rows), the 128x4 student, the demo teacher, 32 mined negatives per query, scored with ITM + 64 x ITC. Mining and
scoring run once into runs/bench-epoch (re-used by later runs: the artifact contract). Each row then trains one
epoch with the real `distill` stage from the same student and seed (`--force`, so it always trains) and reports
its wall time (the stage's whole call: loading, packing, steps, saving) and what it encoded, from its
metrics.jsonl. Rows run one after another in one process, so their ratios share the machine's state; `none` runs
before each loss's rows and after the last, and each row's `epoch_time_vs_none` is against the mean of the two
`none` epochs around it (`epoch_cpu_time_vs_none`: the same in the process's CPU time). A first `none` epoch warms
the process up and is recorded apart (`warm_up_s`), never compared with: the first epoch of a process is slower
by a quarter to a third, and taken as the baseline it made every ratio after it look smaller.

Rows: `none` as the demo trains it (batch 64); each teacher loss on batches of 256 with the whole lists (every
entry encoded with gradient, `--out-of-batch encode`), with the lists cut to the batch's own pairs (`--out-of-batch
drop`), with a budget of 256, 512, 768 or 1,024 encoded images and captions outside the pairs, those listed most
often (`--out-of-batch budget --out-of-batch-budget N --out-of-batch-priority listed`), with 512 or 768 (the
default: 3 per query) by teacher rank, and 512 by steep teacher rank (`teacher-rank-steep`, `make demo`'s KL row),
and the default's with the outside items' gradient through the last 1 or
2 of the 4 blocks of each tower (`--outside-grad-layers`) or with its blocks recomputed in the backward
(`--grad-checkpointing`); and KL with in-batch lists on batches packed in clusters
of 64 rows.

`python -m bench.epoch_bench [TEXT ...]` runs `none` and the rows whose name holds one of the TEXTs, writing
bench/results/epoch-some.json (without TEXTs: every row, into epoch.json).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "runs" / "bench-epoch"
LOSSES = {"kl": {"loss": "kl", "teacher_temperature": 30},
          "cprd": {"loss": "cprd", "num_valid": 32},
          "cprd-kl": {"loss": "cprd-kl", "num_valid": 32, "teacher_temperature": 30, "kl_weight": 2.0,
                      "distill_weight": 0.5}}
DEFAULT = {"out_of_batch": "budget", "out_of_batch_budget": 768, "out_of_batch_priority": "teacher-rank"}
LISTS = {"whole lists": {"out_of_batch": "encode"}, "in-batch lists": {"out_of_batch": "drop"},
         **{f"budget {n}": {"out_of_batch": "budget", "out_of_batch_budget": n, "out_of_batch_priority": "listed"}
            for n in (256, 512, 768, 1024)},
         **{f"budget {n} by teacher rank" + (" (default)" if n == 768 else ""):
            {"out_of_batch": "budget", "out_of_batch_budget": n, "out_of_batch_priority": "teacher-rank"}
            for n in (512, 768)},
         "budget 512 by steep teacher rank (kl in the demo)":
            {"out_of_batch": "budget", "out_of_batch_budget": 512, "out_of_batch_priority": "teacher-rank-steep"},
         **{f"budget 768 by teacher rank, gradient through the last {n} block(s)":
            {**DEFAULT, "outside_grad_layers": n} for n in (1, 2)},
         "budget 768 by teacher rank, --grad-checkpointing": {**DEFAULT, "grad_checkpointing": True}}


def _data() -> tuple[Path, Path]:
    """(run with mine + teacher, the student) of the transfer demo's recipe, made once."""
    from cprd_pipeline.demo import REPO, _in_repo, _prepare_data, _prepare_models
    from cprd_pipeline.demo_recipe import Recipe
    from pipeline.log import make_log
    from stages import stage

    recipe = Recipe.load(REPO / "data" / "demo-transfer.yaml")
    log = make_log(True)
    train, _ = _prepare_data(recipe.corpus, "val", OUT, log)
    student, teacher, meta = _prepare_models(_in_repo(recipe.assets), OUT, log)
    run = OUT / "run"
    stage("mine").run(run=str(run), data=str(train), student=str(student), k=recipe.mine.k, device="cpu")
    stage("score-teacher").run(run=str(run), teacher=str(teacher), score="itm+itc",
                               itc_weight=float(meta["itc_weight"]), device="cpu")
    return run, student


def _epoch(run: Path, student: Path, name: str, options: dict) -> dict:
    from stages import stage

    out = OUT / "students" / name
    t, cpu = time.perf_counter(), time.process_time()
    stage("distill").run(run=str(run), out=str(out), student=str(student), num_negatives=32, epochs=1,
                         warmup_steps=10, seed=0, save_every=10**6, device="cpu", force=True,
                         **{"batch_size": 256, "lr": 8e-4, **options})
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    total = lambda key: sum(r.get(key, 0) for r in rows)
    return {"epoch_s": wall, "epoch_cpu_s": cpu, "steps": len(rows), "images_encoded": total("images_encoded"),
            "texts_encoded": total("texts_encoded"),
            "in_batch_share": total("negatives_in_batch") / max(1, total("negatives")),
            "negatives_listed_per_query": total("negatives") / 12000, "options": options}


def main(only: tuple[str, ...] = ()) -> dict:
    run, student = _data()
    wanted = lambda row: not only or any(text in row for text in only)
    none = lambda: _epoch(run, student, "none", {"loss": "none", "batch_size": 64, "lr": 2e-4})
    # `none` runs before each loss's rows and after the last: the machine's speed drifts over a run of many
    # epochs, so each row is compared with the mean of the two `none` epochs around it
    groups = [[(f"{name}, {lists}", f"{name}-{'-'.join(map(str, how.values()))}", {**options, **how})
               for lists, how in LISTS.items()] for name, options in LOSSES.items()]
    groups[0].append(("kl, packed in clusters of 64, in-batch lists", "kl-packed",
                      {**LOSSES["kl"], "batching": "packed", "out_of_batch": "drop"}))
    groups = [[row for row in group if wanted(row[0])] for group in groups]
    warm_up = none()["epoch_s"]
    rows, nones = {}, [none()]
    for group in (g for g in groups if g):
        measured = {label: _epoch(run, student, name, options) for label, name, options in group}
        nones.append(none())
        for row in measured.values():
            row["none_around_s"] = [nones[-2]["epoch_s"], nones[-1]["epoch_s"]]
            for key, ratio in (("epoch_s", "epoch_time_vs_none"), ("epoch_cpu_s", "epoch_cpu_time_vs_none")):
                row[ratio] = row[key] / ((nones[-2][key] + nones[-1][key]) / 2)
        rows.update(measured)
    return {"data": "make demo-transfer's training data: 2,000 images x 5 captions, 128x4 CLIP student, 32 negatives",
            "target_epoch_time_vs_none": 1.5, "warm_up_s": warm_up, "none (batch 64)": nones, "rows": rows}


if __name__ == "__main__":
    from bench.common import write

    import sys

    only = tuple(sys.argv[1:])
    write("epoch-some" if only else "epoch", main(only))
