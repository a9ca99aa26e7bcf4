"""The demo's own student (tiny CLIP) and teacher (tiny BLIP ITM), trained from scratch on the demo corpus.

`make demo-assets` runs `build_assets`: train both on the `pretrain` split, choose the teacher's ITC weight on
a validation split, and pack each model into one small safetensors file under data/demo/. Packing keeps
fp16 weights and only the word-embedding rows of tokens the demo's captions use (the BERT vocabulary has
30,522 rows; the captions use a few dozen), so each file is a few MB; `unpack` rebuilds a normal
Hugging Face folder (config, weights, tokenizer, image processor) that the pipeline loads like any other.
The student's training is deterministic for a seed, torch version and thread count: a rebuild gives the same
weights. The teacher's ITM stage is not bit-exact on CPU; two builds drifted apart after about 100 steps,
ending at val re-rank RSUM 350.2 and 351.5. A rebuild therefore gives an equivalent teacher, not the same
file.

As in practice, the teacher is the model that had more to learn from: it trains on all 30,000 pretrain
images and for longer, the student on the first 6,000 (on 6,000 both overfit: in-batch ITC loss 0.8 on
their training images, 2.0 on validation ones). Distillation is then how the student gets what the teacher
knows, from the teacher's scores on the pipeline's own `train` split.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..losses import itc_loss
from ..models import load_image, projected
from ..teachers import blip_itc_features, blip_itm_logodds
from ..tiny_models import bert_tokenizer_dir, save_tiny_blip, save_tiny_clip
from ..training import ramped_cosine_lr

# The student is the small, fast model (2 layers, width 64); the teacher has 4 layers of width 128 per tower.
STUDENT = dict(hidden=64, layers=2, heads=4)
TEACHER = dict(hidden=128, layers=4, heads=4)


def new_student(path: Path, seed: int, size: dict | None = None) -> Path:
    return save_tiny_clip(path, seed=seed, projection_dim=128, max_positions=16, **(size or STUDENT))


def new_teacher(path: Path, seed: int) -> Path:
    return save_tiny_blip(path, seed=seed, projection_dim=128, **TEACHER)


# ---------------------------------------------------------------- data in memory
def load_split(ann: Path, processor, tokenizer, max_length: int = 16, limit: int | None = None):
    """Pixels [N,3,H,W], caption tokens [N,5,L] (+ mask), combination ids [N] of an annotation file's first
    `limit` records (all by default)."""
    records = json.loads(Path(ann).read_text())[:limit]
    pixels = processor(images=[load_image(str(Path(ann).parent / r["image"])) for r in records],
                       return_tensors="pt")["pixel_values"]
    flat = [c for r in records for c in r["caption"]]
    tok = tokenizer(flat, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    n = len(records)
    return (pixels, tok["input_ids"].view(n, 5, -1), tok["attention_mask"].view(n, 5, -1),
            torch.tensor([r["combination"] for r in records]))


def _cosine_lr(opt, base: float, step: int, total: int, warmup: int) -> None:
    lr = ramped_cosine_lr(base, step, total, warmup)
    for g in opt.param_groups:
        g["lr"] = lr


def _batches(n: int, batch: int, steps: int, gen: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (batch,), generator=gen)


# ---------------------------------------------------------------- student
def train_student(model_dir: Path, ann: Path, steps: int, seed: int, log: Callable = print, batch: int = 128,
                  lr: float = 1e-3, images: int | None = None) -> None:
    """Contrastive training on the first `images` records, with soft targets: two items of the same
    combination are not negatives."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel.from_pretrained(model_dir).train()
    px, ids, att, combo = load_split(ann, AutoImageProcessor.from_pretrained(model_dir),
                                     AutoTokenizer.from_pretrained(model_dir), limit=images)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step, idx in enumerate(_batches(len(px), batch, steps, gen)):
        _cosine_lr(opt, lr, step, steps, 50)
        cap = torch.randint(0, 5, (batch,), generator=gen)
        img = projected(model.get_image_features(pixel_values=px[idx]))
        txt = projected(model.get_text_features(input_ids=ids[idx, cap], attention_mask=att[idx, cap]))
        same = combo[idx][:, None] == combo[idx][None, :]
        loss = itc_loss(img, txt, model.logit_scale.exp().clamp(max=100), same)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"[student] step {step + 1}/{steps} itc {loss.item():.4f} ({time.time() - t0:.0f}s)")
    model.save_pretrained(model_dir)


# ---------------------------------------------------------------- teacher
def _blip_itc(model, px, ids, att):
    vis = model.vision_model(pixel_values=px).last_hidden_state            # [B, P, H]
    return (vis, *blip_itc_features(model, vis, ids, att))



def _confusable_table(combo: torch.Tensor, tokenizer, max_length: int = 16):
    """For constructed negatives: each combination's minimal edits (padded by repetition to [C, 4]), every
    combination's five captions as tokens [C, 5, L], and the pretrain rows of each combination."""
    from .corpus import captions, combinations, confusable

    combos = combinations()
    edits = torch.tensor([(confusable(c) * 4)[:4] for c in range(len(combos))])
    tok = tokenizer([t for c in combos for t in captions(c)], padding="max_length", truncation=True,
                    max_length=max_length, return_tensors="pt")
    rows = [torch.nonzero(combo == c).squeeze(1) for c in range(len(combos))]
    return edits, tok["input_ids"].view(len(combos), 5, -1), tok["attention_mask"].view(len(combos), 5, -1), rows


def train_teacher(model_dir: Path, ann: Path, itc_steps: int, itm_steps: int, seed: int, log: Callable = print,
                  itc_batch: int = 128, itm_batch: int = 96, itc_lr: float = 1e-3, itm_lr: float = 5e-4) -> None:
    """Two stages (only this made a from-scratch ITM head learn): ITC alone, then ITC + ITM + ranking.

    The ITC temperature is learned, as CLIP's (BLIP's retrieval class has no parameter for it, and ranking by
    cosine does not need one). Stage two scores each (image, caption) pair against four negatives: a hard
    negative caption and a hard negative image drawn from the ITC similarities among other combinations in
    the batch, and two *constructed* ones: the same caption template filled with a minimal edit of the
    combination (objects swapped, axis flipped, colours or shapes exchanged; `corpus.confusable`), and an
    image of such an edit. The constructed negatives are exactly what a dual encoder confuses, and a batch
    rarely holds them. ITM is trained as binary match/no-match; the ranking term asks each positive's
    log-odds to beat its negatives'.
    """
    from transformers import AutoImageProcessor, AutoTokenizer, BlipForImageTextRetrieval

    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval.from_pretrained(model_dir).train()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    px, ids, att, combo = load_split(ann, AutoImageProcessor.from_pretrained(model_dir), tokenizer)
    edits, edit_ids, edit_att, rows = _confusable_table(combo, tokenizer)
    # an edit whose combination has no pretrain image (held out) falls back to the combination's other edits
    has_image = torch.tensor([[len(rows[e]) > 0 for e in row] for row in edits.tolist()])
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for stage, steps, batch, lr in (("itc", itc_steps, itc_batch, itc_lr), ("itc+itm", itm_steps, itm_batch, itm_lr)):
        opt = torch.optim.AdamW([*model.parameters(), log_scale], lr=lr, weight_decay=0.05)
        for step, idx in enumerate(_batches(len(px), batch, steps, gen)):
            _cosine_lr(opt, lr, step, steps, 50)
            cap = torch.randint(0, 5, (batch,), generator=gen)
            b_ids, b_att = ids[idx, cap], att[idx, cap]
            vis, img_f, txt_f = _blip_itc(model, px[idx], b_ids, b_att)
            same = combo[idx][:, None] == combo[idx][None, :]
            sims = img_f @ txt_f.T
            scale = log_scale.exp().clamp(max=100)
            loss = itc_loss(img_f, txt_f, scale, same)
            terms = {"itc": loss.item()}
            if stage == "itc+itm":
                with torch.no_grad():
                    w = torch.softmax(sims * scale, dim=1).masked_fill(same, 0) + 1e-9
                    hard_txt = torch.multinomial(w, 1, generator=gen).squeeze(1)
                    w = torch.softmax(sims.T * scale, dim=1).masked_fill(same.T, 0) + 1e-9
                    hard_img = torch.multinomial(w, 1, generator=gen).squeeze(1)
                    # constructed: [B] edited combinations for the caption, and ones with an image for the image
                    edit = edits[combo[idx], torch.randint(0, 4, (batch,), generator=gen)]
                    ok = has_image[combo[idx]]                                              # [B, 4]
                    usable = ok.any(1)
                    pick = torch.multinomial(ok.float() + (~usable)[:, None].float(), 1, generator=gen).squeeze(1)
                    edit_img_combo = edits[combo[idx], pick]
                    edit_img = torch.tensor([rows[c][torch.randint(0, max(len(rows[c]), 1), (1,), generator=gen)].item()
                                             if len(rows[c]) else 0 for c in edit_img_combo.tolist()])
                edit_vis = model.vision_model(pixel_values=px[edit_img]).last_hidden_state
                pos = blip_itm_logodds(model, vis, b_ids, b_att)
                negs = [blip_itm_logodds(model, vis, b_ids[hard_txt], b_att[hard_txt]), blip_itm_logodds(model, vis[hard_img], b_ids, b_att),
                        blip_itm_logodds(model, vis, edit_ids[edit, cap], edit_att[edit, cap]),
                        blip_itm_logodds(model, edit_vis, b_ids, b_att)[usable]]
                poss = [pos, pos, pos, pos[usable]]
                scores = torch.cat([pos, *negs])
                labels = torch.cat([torch.ones_like(pos)] + [torch.zeros_like(n) for n in negs])
                itm = F.binary_cross_entropy_with_logits(scores, labels)
                rank = sum(F.softplus(n - p).mean() for n, p in zip(negs, poss)) / len(negs)
                loss = loss + itm + rank
                terms.update(itm=itm.item(), rank=rank.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 100 == 0 or step == steps - 1:
                shown = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
                log(f"[teacher] {stage} scale {scale.item():.1f} step {step + 1}/{steps} {shown} ({time.time() - t0:.0f}s)")
    model.save_pretrained(model_dir)


# ---------------------------------------------------------------- packing
def demo_token_ids(captions: list[str]) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bert_tokenizer_dir())
    ids = set(tok.all_special_ids)
    for c in captions:
        ids.update(tok(c)["input_ids"])
    return sorted(ids)


def pack(model_dir: Path, out: Path, kind: str, token_ids: list[int], metadata: dict) -> None:
    """One fp16 safetensors file: every tensor, word embeddings cut to `token_ids`; config in the metadata."""
    from safetensors.torch import load_file, save_file

    state = load_file(Path(model_dir) / "model.safetensors")
    keep = torch.tensor(token_ids)
    packed = {}
    for name, t in state.items():
        if name.endswith("word_embeddings.weight") or name.endswith("token_embedding.weight"):
            t = t[keep]
        packed[name] = t.to(torch.float16).contiguous()
    packed["__token_ids__"] = keep.to(torch.int32)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    save_file(packed, str(out), metadata={"kind": kind, "config": json.dumps(config), **{k: json.dumps(v) for k, v in metadata.items()}})


def unpack(asset: Path, out: Path) -> dict:
    """Rebuild a Hugging Face model folder from a packed asset; returns the asset's metadata."""
    from safetensors import safe_open
    from transformers import (AutoTokenizer, BlipForImageTextRetrieval, BlipImageProcessor, CLIPImageProcessor,
                              CLIPModel)
    from transformers import BlipConfig, CLIPConfig

    with safe_open(str(asset), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    kind, config = meta["kind"], json.loads(meta["config"])
    keep = tensors.pop("__token_ids__").long()
    if kind == "student":
        model = CLIPModel(CLIPConfig.from_dict(config))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        model = BlipForImageTextRetrieval(BlipConfig.from_dict(config))
        processor = BlipImageProcessor(size={"height": 32, "width": 32})
    state = model.state_dict()
    for name, t in tensors.items():
        t = t.float()
        if name.endswith("word_embeddings.weight") or name.endswith("token_embedding.weight"):
            full = torch.zeros_like(state[name])
            full[keep] = t
            t = full
        state[name] = t
    model.load_state_dict(state)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(bert_tokenizer_dir()).save_pretrained(out)
    processor.save_pretrained(out)
    return {k: json.loads(v) for k, v in meta.items() if k not in ("kind", "config")}


# ---------------------------------------------------------------- the whole recipe
ITC_WEIGHTS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


def build_assets(out: Path, work: Path, seed: int = 0, student_steps: int = 1200, itc_steps: int = 2400,
                 itm_steps: int = 2000, log: Callable = print, student_size: dict | None = None,
                 teacher_from: Path | None = None) -> dict:
    """Generate the pretrain/val splits, train student and teacher, pick the ITC weight on val, pack both.

    student_size: the student's hidden/layers/heads (default STUDENT). teacher_from: an assets folder whose
    packed teacher (and ITC weight) is reused as it is, so that only a student is trained (a student-size study).
    """
    from ..corpus import read_corpus
    from ..models import DualEncoder
    from ..retrieval import evaluate_retrieval
    from ..teachers import load_teacher
    from .corpus import DemoCorpusSpec, combinations, captions, generate

    torch.set_num_threads(2)
    spec = DemoCorpusSpec(seed=seed)
    data = generate(spec, work / "data", splits=("pretrain", "val"))
    student = new_student(work / "student", seed, student_size)
    train_student(student, data["pretrain"], student_steps, seed, log, images=spec.student_images)
    if teacher_from is not None:
        teacher = work / "teacher"
        unpack(Path(teacher_from) / "teacher.safetensors", teacher)
        reused = json.loads((Path(teacher_from) / "assets.json").read_text())
    else:
        teacher = new_teacher(work / "teacher", seed)
        train_teacher(teacher, data["pretrain"], itc_steps, itm_steps, seed, log)

    val_corpus = read_corpus(str(data["val"]), "auto", None, None, "image", "text", None, log=log)
    encoder, cross = DualEncoder(str(student), device="cpu"), load_teacher(str(teacher))

    def val(itc_weight: float | None = None) -> dict:
        """Recall on val: the student's own (itc_weight None), or the teacher re-ranking its top 16."""
        m = evaluate_retrieval(val_corpus, encoder, None if itc_weight is None else cross, 16, itc_weight or 0.0,
                               progress=False)
        return m if itc_weight is None else m["rerank"]

    results = {"student": val()}
    log(f"[assets] val student RSUM {results['student']['rsum']:.1f}")
    for w in ((reused["itc_weight"],) if teacher_from is not None else ITC_WEIGHTS):
        results[f"itm+{w:g}itc"] = val(w)
        log(f"[assets] val rerank itc_weight {w:g}: RSUM {results[f'itm+{w:g}itc']['rsum']:.1f} "
            f"(student {results['student']['rsum']:.1f})")
    best = reused["itc_weight"] if teacher_from is not None else \
        max(ITC_WEIGHTS, key=lambda w: results[f"itm+{w:g}itc"]["rsum"])
    meta = {"seed": seed, "student_images": spec.student_images, "teacher_images": spec.pretrain_images,
            "student_steps": student_steps, "itc_steps": itc_steps, "itm_steps": itm_steps,
            "itc_weight": best, "torch": torch.__version__, "student_size": student_size or STUDENT,
            "teacher_from": str(teacher_from) if teacher_from else None,
            "val_rsum": {k: v["rsum"] for k, v in results.items()}}
    tokens = demo_token_ids([c for combo in combinations() for c in captions(combo)])
    out.mkdir(parents=True, exist_ok=True)
    pack(student, out / "student.safetensors", "student", tokens, meta)
    pack(teacher, out / "teacher.safetensors", "teacher", tokens, meta)
    (out / "assets.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"[assets] itc_weight {best:g}; wrote {out}")
    return meta
