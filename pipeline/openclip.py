"""open_clip students (`pip install 'cprd-pipeline[openclip]'`): the adapters that let `DualEncoder` mine, train,
save and evaluate an open_clip model as it does a transformers one.

A student is given as

- `open_clip:ARCH@WEIGHTS`: an architecture open_clip knows (its built-in configs, or one registered with
  `open_clip.add_model_config`) and a weights file (.safetensors, .bin, .pt), as
  `open_clip.create_model_and_transforms(ARCH, pretrained=WEIGHTS)` takes them; identified by the architecture's
  config and the file's hash;
- a folder holding `open_clip_config.json` (`model_cfg`, `preprocess_cfg`) and one weights file, as open_clip's
  hub folders and `distill`'s `final/` do; identified by its files' hashes, as any model folder.

What `distill` saves (`final/`, `best/`): `open_clip_config.json` and `open_clip_model.safetensors` (plus the
tokenizer files of a model whose text tower uses a Hugging Face tokenizer, and the model card), loadable by
open_clip as `create_model_and_transforms("local-dir:final")` or `(ARCH, pretrained="final/open_clip_model.
safetensors")`, and by this pipeline as a folder student.

The text side: open_clip's tokenizer pads every caption to the tower's context length and its text tower reads
all of it (a causal mask; the caption is pooled at its end token), so `attention_mask` is all ones and unused.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import PipelineError

PREFIX = "open_clip:"
CONFIG = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"


def is_open_clip(name_or_path: str) -> bool:
    """An `open_clip:ARCH@WEIGHTS` spec or a folder with an open_clip_config.json."""
    return str(name_or_path).startswith(PREFIX) or (Path(name_or_path) / CONFIG).is_file()


def parse(spec: str) -> tuple[str, Path]:
    """`open_clip:ARCH@WEIGHTS` -> (ARCH, WEIGHTS); a one-line error naming the spec when it is not one."""
    arch, at, weights = spec[len(PREFIX):].partition("@")
    if not arch or not at or not weights:
        raise PipelineError(f"{spec}: an open_clip student is open_clip:ARCH@WEIGHTS_FILE (e.g. "
                            "open_clip:ViT-B-32@/models/vit-b-32.safetensors) or a folder with open_clip_config.json")
    return arch, Path(weights).expanduser()


def _open_clip():
    try:
        import open_clip
    except ImportError as e:   # not installed, or its torchvision cannot load beside this torch
        raise PipelineError(f"open_clip students need open-clip-torch (pip install 'cprd-pipeline[openclip]'); "
                            f"importing it failed: {e}") from None
    return open_clip


def config(name_or_path: str) -> dict[str, Any]:
    """{"model_cfg", "preprocess_cfg"} of the student: the folder's open_clip_config.json, or the architecture's
    registered config (preprocess_cfg then open_clip's defaults for it, filled in when the model is built)."""
    if not str(name_or_path).startswith(PREFIX):
        path = Path(name_or_path) / CONFIG
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise PipelineError(f"{path}: not a readable open_clip config ({e.__class__.__name__})") from None
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg"), dict):
            raise PipelineError(f"{path}: has no model_cfg (not an open_clip model folder)")
        return cfg
    arch, _ = parse(name_or_path)
    model_cfg = _open_clip().get_model_config(arch)
    if model_cfg is None:
        raise PipelineError(f"{name_or_path}: open_clip knows no architecture {arch!r} (its names: "
                            "open_clip.list_models(); register another with open_clip.add_model_config)")
    return {"model_cfg": model_cfg, "preprocess_cfg": {}}


def learns_bias(name_or_path: str) -> bool:
    """Whether the model has a learned logit bias (open_clip's SigLIP models: `init_logit_bias` in model_cfg)."""
    return config(name_or_path)["model_cfg"].get("init_logit_bias") is not None


def identity(name_or_path: str) -> dict[str, Any]:
    """For `open_clip:ARCH@WEIGHTS`: the architecture's config and the weights file's hash, never its path (a
    folder is identified by `models.model_identity` as any model folder)."""
    arch, weights = parse(name_or_path)
    if not weights.is_file():
        raise PipelineError(f"{name_or_path}: no such weights file {weights}")
    h = hashlib.sha256()
    with open(weights, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return {"open_clip": arch, "model_cfg": config(name_or_path)["model_cfg"], "weights": h.hexdigest()}


def exists(name_or_path: str) -> bool:
    """Whether the student is still where it was given (the weights file of a spec, or the folder)."""
    if str(name_or_path).startswith(PREFIX):
        return parse(name_or_path)[1].is_file()
    return Path(name_or_path).is_dir()


class OpenClipModel(torch.nn.Module):
    """An open_clip CLIP / CustomTextCLIP behind the transformers dual-encoder surface the pipeline uses:
    get_image_features, get_text_features, logit_scale (and logit_bias), save_pretrained."""

    def __init__(self, clip: torch.nn.Module, open_clip_config: dict[str, Any]):
        super().__init__()
        self.clip = clip
        self.open_clip_config = open_clip_config

    @property
    def logit_scale(self) -> torch.nn.Parameter:
        return self.clip.logit_scale

    @property
    def logit_bias(self) -> torch.nn.Parameter | None:
        return getattr(self.clip, "logit_bias", None)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, E], not normalised (as encode_image)."""
        return self.clip.encode_image(pixel_values)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, context_length] token ids -> [B, E], not normalised (as encode_text; attention_mask unused)."""
        return self.clip.encode_text(input_ids)

    def save_pretrained(self, folder: Path) -> None:
        """open_clip_config.json and open_clip_model.safetensors: what open_clip's local-dir: loader reads."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG).write_text(json.dumps(self.open_clip_config, indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.clip.state_dict().items()}, folder / WEIGHTS)


class OpenClipImageProcessor:
    """open_clip's eval transform behind the `processor(images=..., return_tensors="pt")` call."""

    def __init__(self, transform: Any):
        self.transform = transform

    def __call__(self, images: Any, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        one = not isinstance(images, (list, tuple))
        pixels = torch.stack([self.transform(im) for im in ([images] if one else images)])   # [B, 3, H, W]
        return {"pixel_values": pixels}

    def save_pretrained(self, folder: Path) -> None:
        """Nothing: the transform is rebuilt from open_clip_config.json's preprocess_cfg."""


class OpenClipTokenizer:
    """open_clip's tokenizer behind the transformers call the pipeline makes; ids are padded to the context
    length (open_clip's text towers are built for it), so padding, truncation and max_length are its own."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, texts: Sequence[str], padding: Any = True, truncation: bool = True, max_length: Any = None,
                 return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        ids = self.tokenizer(list(texts))                                     # [B, context_length]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def save_pretrained(self, folder: Path) -> None:
        """A Hugging Face tokenizer's files (open_clip's local-dir: loader reads them from the folder); nothing
        for open_clip's own tokenizers, which ship with it."""
        inner = getattr(self.tokenizer, "tokenizer", None)
        if hasattr(inner, "save_pretrained"):
            inner.save_pretrained(folder)


def load(name_or_path: str) -> tuple[OpenClipModel, OpenClipImageProcessor, OpenClipTokenizer, int]:
    """(model, image processor, tokenizer, context length) of an open_clip student; a one-line error naming it
    when it cannot be built (unknown architecture, weights that do not fit it)."""
    open_clip = _open_clip()
    cfg = config(name_or_path)
    if str(name_or_path).startswith(PREFIX):
        arch, weights = parse(name_or_path)
        if not weights.is_file():
            raise PipelineError(f"{name_or_path}: no such weights file {weights}")
        name, kw = arch, {"pretrained": str(weights)}
    else:
        if not any(Path(name_or_path).glob(p) for p in ("*.safetensors", "*.bin", "*.pt", "*.pth")):
            raise PipelineError(f"{name_or_path}: open_clip model folder has no weights file")
        name, kw = f"local-dir:{name_or_path}", {}
    try:
        clip, _, transform = open_clip.create_model_and_transforms(name, **kw)
        tokenizer = open_clip.get_tokenizer(name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise PipelineError(f"{name_or_path}: cannot build the open_clip model ({first[:300]})") from None
    preprocess = getattr(clip.visual, "preprocess_cfg", None) or cfg.get("preprocess_cfg") or {}
    saved = {"model_cfg": cfg["model_cfg"], "preprocess_cfg": dict(preprocess)}
    context = int(cfg["model_cfg"].get("text_cfg", {}).get("context_length", 77))
    return OpenClipModel(clip, saved), OpenClipImageProcessor(transform), OpenClipTokenizer(tokenizer), context
