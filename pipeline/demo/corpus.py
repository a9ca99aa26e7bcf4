"""The demo corpus: small images of coloured shapes in spatial relations, five captions each.

Each image shows two described objects, A and B, with A left of B or A above B, and (half the time) a smaller
third object that no caption mentions. A *combination* is (type of A, type of B, axis): 12 object types
(4 colours x 3 shapes) give 12 x 11 x 2 = 264. Captions differ from their hardest negatives only in which
colour binds to which shape, or in the relation: what a single-vector dual encoder confuses and a
cross-encoder, which looks at words and pixels together, can resolve.

Splits (deterministic for a seed): `held_out` combinations never appear in `train` or `pretrain`; `test` has
one image of every combination, so each test caption has exactly one correct image and the held-out
combinations are mixed into a gallery of seen ones. `val` is built like `test` from other random draws; the
demo's assets choose their settings on it, never on `test`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
TYPES = [(c, s) for c in COLOURS for s in SHAPES]
AXES = ("horizontal", "vertical")
TEMPLATES = {
    "horizontal": ["a {a} left of a {b}", "a {b} right of a {a}", "a {a} to the left of a {b}",
                   "a {b} to the right of a {a}", "a {a} with a {b} on its right"],
    "vertical": ["a {a} above a {b}", "a {b} below a {a}", "a {a} on top of a {b}",
                 "a {b} under a {a}", "a {a} with a {b} below it"],
}
SIZE = 32


@dataclass(frozen=True)
class DemoCorpusSpec:
    seed: int = 0
    held_out: int = 40          # combinations kept out of training
    pretrain_images: int = 30000  # for training the demo's own teacher (make demo-assets)
    student_images: int = 6000    # the first ones of them train the demo's own student
    train_images: int = 2000    # the pipeline's training split (mine -> score-teacher -> distill)
    noise: float = 6.0


def combinations() -> list[tuple[int, int, str]]:
    return [(a, b, axis) for a in range(len(TYPES)) for b in range(len(TYPES)) if a != b for axis in AXES]


def split_combinations(spec: DemoCorpusSpec) -> tuple[list[int], list[int]]:
    """(seen, held_out) indices into combinations()."""
    order = np.random.default_rng(spec.seed).permutation(len(combinations()))
    return sorted(order[spec.held_out:].tolist()), sorted(order[: spec.held_out].tolist())


def confusable(c: int) -> list[int]:
    """Combinations one minimal edit away from combination `c`: its two objects swapped, its axis flipped, or
    their colours or their shapes exchanged. Captions of these differ from c's only in what binds to what."""
    combos = combinations()
    index = {combo: i for i, combo in enumerate(combos)}
    a, b, axis = combos[c]
    (ca, sa), (cb, sb) = TYPES[a], TYPES[b]
    t = {ty: i for i, ty in enumerate(TYPES)}
    edits = [(b, a, axis), (a, b, AXES[1 - AXES.index(axis)]),
             (t[(cb, sa)], t[(ca, sb)], axis), (t[(ca, sb)], t[(cb, sa)], axis)]
    return sorted({index[e] for e in edits if e[0] != e[1] and index[e] != c})


def _name(t: int) -> str:
    colour, shape = TYPES[t]
    return f"{colour} {shape}"


def captions(combo: tuple[int, int, str]) -> list[str]:
    a, b, axis = combo
    return [t.format(a=_name(a), b=_name(b)) for t in TEMPLATES[axis]]


def _draw(draw: ImageDraw.ImageDraw, t: int, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    colour, shape = TYPES[t]
    fill = tuple(int(np.clip(v + rng.normal(0, 18), 0, 255)) for v in COLOURS[colour])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)


def render(combo: tuple[int, int, str], rng: np.random.Generator, noise: float) -> Image.Image:
    """One image of a combination: A and B in a 3x3 grid along the axis, maybe a distractor elsewhere."""
    a, b, axis = combo
    bg = int(rng.integers(20, 90)) if rng.random() < 0.5 else int(rng.integers(160, 235))
    img = Image.new("RGB", (SIZE, SIZE), tuple(int(np.clip(bg + rng.normal(0, 8), 0, 255)) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    cell = SIZE / 3
    line = int(rng.integers(0, 3))
    first, second = sorted(rng.choice(3, size=2, replace=False).tolist())
    cells = [(first, line), (second, line)] if axis == "horizontal" else [(line, first), (line, second)]
    used = set(cells)
    for t, (col, row) in zip((a, b), cells):
        cx = (col + 0.5) * cell + rng.uniform(-1.5, 1.5)
        cy = (row + 0.5) * cell + rng.uniform(-1.5, 1.5)
        _draw(draw, t, cx, cy, rng.uniform(3.8, 5.0), rng)
    if rng.random() < 0.5:  # an unmentioned third object
        free = [(c, r) for c in range(3) for r in range(3) if (c, r) not in used]
        col, row = free[int(rng.integers(len(free)))]
        other = int(rng.choice([t for t in range(len(TYPES)) if t not in (a, b)]))
        _draw(draw, other, (col + 0.5) * cell, (row + 0.5) * cell, rng.uniform(2.6, 3.4), rng)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, noise, size=(SIZE, SIZE, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def generate_split(spec: DemoCorpusSpec, split: str, out: Path) -> Path:
    """Write images and an ALBEF-style annotation file (one record per image, caption list) for a split.

    `test` and `val` are galleries of one image per combination; `test-2`, `val-1`, ... are further galleries
    built the same way from other draws (the combinations' captions are shared by all their images, so a larger
    evaluation is several galleries, each scored alone, not one gallery with several images per combination).
    Records also carry `combination`, the index into combinations() (the pipeline ignores it).
    """
    combos = combinations()
    seen, _ = split_combinations(spec)
    base, _, gallery = split.partition("-")
    salt = {"pretrain": 1, "train": 2, "test": 3, "val": 4}[base]
    rng = np.random.default_rng([spec.seed, salt] + ([int(gallery)] if gallery else []))
    if base in ("test", "val"):  # one image of every combination
        chosen = list(range(len(combos)))
    else:
        n = spec.pretrain_images if split == "pretrain" else spec.train_images
        chosen = rng.choice(seen, size=n).tolist()
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, c in enumerate(chosen):
        name = f"{split}/{i:05d}.png"
        render(combos[c], rng, spec.noise).save(out / name, optimize=False, compress_level=1)
        records.append({"image": name, "caption": captions(combos[c]), "image_id": f"{split}-{i:05d}",
                        "combination": int(c)})
    path = out / f"{split}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records))
    tmp.replace(path)
    return path


def generate(spec: DemoCorpusSpec, out: Path, splits=("train", "test")) -> dict[str, Path]:
    return {s: generate_split(spec, s, out) for s in splits}
