"""Shared fixtures: tiny models saved with save_pretrained (real BERT tokenizer), tiny corpora on disk."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

from pipeline.tiny_models import save_tiny_blip, save_tiny_clip, save_tiny_siglip, save_tiny_vilt  # noqa: E402


def saved_tiny_model(name: str, save: Callable[[Path], Path]) -> Any:
    """A session fixture `name`: the tiny model `save` writes, in a folder of its own (built once per session)."""
    @pytest.fixture(scope="session", name=name)
    def fixture(tmp_path_factory) -> Path:
        return save(tmp_path_factory.mktemp("models") / name.replace("_", "-"))

    return fixture


tiny_clip = saved_tiny_model("tiny_clip", save_tiny_clip)
tiny_siglip = saved_tiny_model("tiny_siglip", save_tiny_siglip)
tiny_blip = saved_tiny_model("tiny_blip", save_tiny_blip)
tiny_vilt = saved_tiny_model("tiny_vilt", save_tiny_vilt)


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


def write_albef_corpus(root: Path, n_images: int = 24, per_image: int = 5, layout: str = "list",
                       seed: int = 0) -> Path:
    """An ALBEF/BLIP annotation file: 'list' = one record per image, 'train' = one record per caption.
    Corpora with the same seed share image bytes (a held-out test corpus needs another seed)."""
    names = write_images(root / "images", n_images, seed)
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
    from cprd_pipeline.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, f"exit {result.exit_code}\n{result.output}"
    return result


def cli_subprocess(*args: str, env: dict | None = None, check: bool = False, launcher: list[str] | None = None,
                   timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the CLI as a real process (for kill/resume and multi-process tests)."""
    cmd = (launcher or [sys.executable, "-m", "cprd_pipeline"]) + [str(a) for a in args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def free_port() -> int:
    """A TCP port nobody listens on now (for torchrun's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    """The launcher prefix for a CLI run under torchrun with `nproc` processes on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", "cprd_pipeline"]


def assert_rows_match(got: list[dict], want: list[dict], float_columns: tuple[str, ...], atol: float = 1e-5) -> None:
    """Rows from different processes or batch sizes: every id column equal exactly, float columns within atol
    (float rounding depends on batch composition and thread count)."""
    import numpy as np

    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k not in float_columns} == \
               {k: v for k, v in w.items() if k not in float_columns}
        for c in float_columns:
            np.testing.assert_allclose(g[c], w[c], atol=atol, rtol=0, err_msg=c)


@pytest.fixture(scope="session")
def mined_run(tmp_path_factory, tiny_clip) -> Path:
    """A complete RUN/mine on a 24-image corpus (k=6, shards of 7 queries). Copy it before writing to it."""
    root = tmp_path_factory.mktemp("mined")
    ann = write_albef_corpus(root / "data")
    cli("mine", "--run", root / "run", "--data", ann, "--student", tiny_clip, "--k", "6", "--shard-size", "7")
    return root / "run"


@pytest.fixture(scope="session")
def scored_run(tmp_path_factory, mined_run, tiny_blip) -> Path:
    """mined_run + a complete RUN/teacher from the tiny BLIP. Copy it before writing to it."""
    import shutil

    root = tmp_path_factory.mktemp("scored")
    shutil.copytree(mined_run, root / "run")
    cli("score-teacher", "--run", root / "run", "--teacher", tiny_blip, "--images-per-shard", "8")
    return root / "run"


# ---------------------------------------------------------------- the run report's HTML
VOID = {"meta", "img", "br", "hr", "input", "link"}


class ReportChecker(HTMLParser):
    """Fails on an unclosed or mismatched tag; collects section ids, images and 'missing' paragraphs."""

    def __init__(self):
        super().__init__()
        self.stack, self.sections, self.images, self.errors = [], [], [], []
        self._missing, self.missing = False, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a["id"])
        if tag == "img":
            self.images.append(a["src"])
        self._missing = a.get("class") == "missing"
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        if self._missing and data.strip():
            self.missing.append(data)


def parse_report_html(path):
    """A report's index.html, checked: every tag closed in order, every image an embedded PNG that decodes."""
    checker = ReportChecker()
    checker.feed(path.read_text())
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    for src in checker.images:  # embedded, and a real PNG each
        assert src.startswith("data:image/png;base64,"), src[:40]
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            im.load()
            assert im.size[0] > 100 and im.size[1] > 100
    return checker
