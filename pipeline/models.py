"""Loading Hugging Face checkpoints (hub name or local folder) and the dual-encoder adapter."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from . import webdataset as wds
from .errors import PipelineError


def check_reachable(name_or_path: str) -> None:
    """Fail fast, before anything is loaded or written, for a model that is neither a local folder nor
    obtainable: a path that does not exist, or a hub name that is not in the local cache when the hub is off
    (HF_HUB_OFFLINE) or cannot be reached (transformers would otherwise retry for minutes, then blame another
    file)."""
    from . import openclip

    if str(name_or_path).startswith(openclip.PREFIX):
        _, weights = openclip.parse(name_or_path)
        if not weights.is_file():
            raise PipelineError(f"{name_or_path}: no such weights file {weights}")
        return
    if Path(name_or_path).exists():
        return
    if _looks_local(name_or_path):
        raise PipelineError(f"{name_or_path}: no such model folder")
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name_or_path, "config.json", cache_dir=_hub_cache()), str):
            return
    except ValueError:   # not a valid hub name either: only a folder could have been meant
        raise PipelineError(f"{name_or_path}: no such model folder") from None
    except OSError:      # no cache to look in: the loader will say what it needs
        return
    missing = f"{name_or_path}: not in the local cache"
    fix = f"download it first with `hf download {name_or_path}` (or pass a local folder)"
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise PipelineError(f"{missing}; {fix}")
    from huggingface_hub import constants

    if not _reachable(constants.ENDPOINT):
        raise PipelineError(f"{missing} and the Hugging Face hub ({constants.ENDPOINT}) cannot be reached; {fix}")


def _looks_local(name: str) -> bool:
    """A name only a folder could have: a path's spelling, more than org/name, or `dir/x` where `dir` is a folder
    here (a typo of a local model folder, not a hub name)."""
    parts = name.split("/")
    return (name.startswith((".", "/", "~")) or "\\" in name or len(parts) > 2 or not all(parts)
            or (len(parts) == 2 and Path(parts[0]).is_dir()))


def _hub_cache() -> str | None:
    """The hub cache as the environment names it now (huggingface_hub reads it once, at import); None: its own."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def _reachable(endpoint: str) -> bool:
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError:
        return False
    return True


def model_identity(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """What a fingerprint records of a model: a local folder's file hashes (not its path: the same files elsewhere
    are the same model), a hub name and revision, or for `open_clip:ARCH@WEIGHTS` the architecture's config and
    the weights file's hash (`pipeline.openclip`)."""
    from . import openclip

    check_reachable(name_or_path)
    if str(name_or_path).startswith(openclip.PREFIX):
        return openclip.identity(name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        files = {}
        for f in sorted(path.rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                h = hashlib.sha256()
                with open(f, "rb") as fh:
                    while block := fh.read(1 << 20):
                        h.update(block)
                files[str(f.relative_to(path))] = h.hexdigest()
        if not files:
            raise PipelineError(f"{name_or_path}: model folder is empty")
        return {"files": files}
    return {"hub": name_or_path, "revision": revision or "main"}


def load_image(path: str) -> Image.Image:
    """Open an image as RGB, or raise a PipelineError naming the file."""
    try:   # a file, or a WebDataset shard member (SHARD.tar#OFFSET+SIZE, read in place)
        with Image.open(wds.open_image_file(path)) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise PipelineError(f"image file not found: {wds.describe(path)}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise PipelineError(f"unreadable image {wds.describe(path)}: {e.__class__.__name__}") from None
    except Image.DecompressionBombError as e:   # more pixels than PIL allows: likely hostile or broken
        raise PipelineError(f"unreadable image {wds.describe(path)}: {e}") from None


def _pretrained(loader: Callable, name_or_path: str, what: str, **kwargs: Any) -> Any:
    from safetensors import SafetensorError   # a truncated or damaged weights file

    try:
        return loader(name_or_path, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise PipelineError(f"{name_or_path}: cannot load its {what} ({first})") from None


def load_processors(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The image processor and tokenizer saved with a model; a clear error if either is missing."""
    from transformers import AutoImageProcessor, AutoTokenizer

    kw = dict(revision=revision, trust_remote_code=trust_remote_code)
    path = Path(name_or_path)
    if path.is_dir() and not (path / "preprocessor_config.json").exists():
        raise PipelineError(f"{name_or_path}: model folder has no image processor (preprocessor_config.json)")
    if path.is_dir() and not any((path / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        raise PipelineError(f"{name_or_path}: model folder has no tokenizer (tokenizer.json / vocab.txt)")
    image_processor = _pretrained(AutoImageProcessor.from_pretrained, name_or_path, "image processor", **kw)
    tokenizer = _pretrained(AutoTokenizer.from_pretrained, name_or_path, "tokenizer", **kw)
    return image_processor, tokenizer


class _ImageDataset(torch.utils.data.Dataset):
    """Loads and preprocesses images in DataLoader workers; a bad file is reported, not raised in the worker."""

    def __init__(self, paths: Sequence[str], processor: Any):
        self.paths, self.processor = list(paths), processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = load_image(self.paths[i])
        except PipelineError as e:
            return None, str(e)
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0], None


def pad_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [3, H, W] images, zero-padding to the largest H and W; pixel_mask [N, H, W] marks real pixels (1)."""
    h, w = max(px.shape[1] for px in images), max(px.shape[2] for px in images)
    pixels = torch.zeros(len(images), images[0].shape[0], h, w, dtype=images[0].dtype)
    mask = torch.zeros(len(images), h, w, dtype=torch.long)
    for i, px in enumerate(images):
        pixels[i, :, : px.shape[1], : px.shape[2]] = px
        mask[i, : px.shape[1], : px.shape[2]] = 1
    return pixels, mask


def _collate(batch):
    for _, err in batch:
        if err is not None:
            return None, None, err
    return (*pad_images([px for px, _ in batch]), None)


def image_batches(paths: Sequence[str], processor: Any, batch_size: int, num_workers: int):
    """(pixel_values [B, 3, H, W], pixel_mask [B, H, W]) in the order of `paths`; PipelineError on a bad image."""
    loader = torch.utils.data.DataLoader(
        _ImageDataset(paths, processor), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
    )
    for pixels, mask, err in loader:
        if err is not None:
            raise PipelineError(err)
        yield pixels, mask


def projected(out: Any) -> torch.Tensor:
    """transformers 4 returns a tensor from get_*_features, 5 a ModelOutput with the projection in pooler_output."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise PipelineError(f"model returned {type(out).__name__} without features")


def learns_bias(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> bool:
    """Whether a student is of the SigLIP family (a learned logit bias beside the scale), read from its config
    alone: transformers' model_type siglip / siglip2, or an open_clip config with init_logit_bias."""
    from . import openclip

    check_reachable(name_or_path)
    if openclip.is_open_clip(name_or_path):
        return openclip.learns_bias(name_or_path)
    from transformers import AutoConfig

    cfg = _pretrained(AutoConfig.from_pretrained, name_or_path, "config", revision=revision,
                      trust_remote_code=trust_remote_code)
    return str(getattr(cfg, "model_type", "")).startswith("siglip")


def model_exists(name_or_path: str, identity: dict[str, Any]) -> bool:
    """Whether a model recorded with `identity` is still where it was found (a hub name always is)."""
    from . import openclip

    if "hub" in identity:
        return True
    if str(name_or_path).startswith(openclip.PREFIX):
        return openclip.exists(name_or_path)
    return Path(name_or_path).exists()


class PadToLength:
    """A tokenizer whose every call pads to `max_length`. SigLIP's text tower pools its last position, so padded to
    the batch's longest caption a caption would embed differently in each batch; SigLIP was trained padded to its
    positions, as its processor pads. Saving saves the tokenizer itself."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, texts: Sequence[str], padding: Any = True, **kwargs: Any) -> Any:
        return self.tokenizer(texts, padding="max_length", **kwargs)

    @property
    def backend_tokenizer(self) -> Any:
        return getattr(self.tokenizer, "backend_tokenizer", None)

    def save_pretrained(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)


class DualEncoder:
    """Any model with `get_image_features` / `get_text_features` (CLIP, SigLIP ...), or an open_clip model
    (`pipeline.openclip`: `open_clip:ARCH@WEIGHTS` or a folder with open_clip_config.json). Outputs are
    L2-normalised.

    kind: "transformers" or "open_clip" (what its saved folder holds: distill writes the sentence-transformers
    module files for the first only)."""

    def __init__(self, name_or_path: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 revision: str | None = None, trust_remote_code: bool = False, model: Any = None):
        from . import openclip

        self.name = name_or_path
        if openclip.is_open_clip(name_or_path):
            self.kind = "open_clip"
            loaded, self.image_processor, self.tokenizer, self.max_length = openclip.load(name_or_path)
            self.model = (model if model is not None else loaded).to(device=device, dtype=dtype).eval()
            self.device, self.dtype = device, dtype
            return
        from transformers import AutoModel

        self.kind = "transformers"
        self.image_processor, self.tokenizer = load_processors(name_or_path, revision, trust_remote_code)
        if model is None:
            model, info = _pretrained(AutoModel.from_pretrained, name_or_path, "model weights", revision=revision,
                                      trust_remote_code=trust_remote_code, output_loading_info=True)
            missing = info.get("missing_keys") or []
            if missing:  # e.g. a cross-encoder's folder loaded as a dual encoder: towers initialised at random
                modules = sorted({k.split(".")[0] for k in missing})
                raise PipelineError(f"{name_or_path}: {len(missing)} weights of {type(model).__name__} are not in "
                                    f"the checkpoint ({', '.join(modules[:4])} would start random); it is not a "
                                    "trained dual encoder")
        for fn in ("get_image_features", "get_text_features"):
            if not hasattr(model, fn):
                raise PipelineError(f"{name_or_path}: {type(model).__name__} has no {fn}; it is not a dual encoder")
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype
        cfg = getattr(model.config, "text_config", model.config)
        self.max_length = int(getattr(cfg, "max_position_embeddings", 77))
        if str(getattr(model.config, "model_type", "")).startswith("siglip"):
            self.tokenizer = PadToLength(self.tokenizer)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, D], L2-normalised, differentiable (used by distill)."""
        out = self.model.get_image_features(pixel_values=pixel_values)
        return torch.nn.functional.normalize(projected(out).float(), dim=-1)

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model.get_text_features(**tokens)
        return torch.nn.functional.normalize(projected(out).float(), dim=-1)

    def tower_layers(self, option: str = "--outside-grad-layers") -> tuple[torch.nn.ModuleList, torch.nn.ModuleList]:
        """(image tower's, text tower's) transformer blocks, in order: where a tower can be cut for gradient
        (distill's --outside-grad-layers) or checkpointed (--grad-checkpointing); `option`, the one that needs
        them, is named if there are none."""
        paths = {"transformers": ("vision_model.encoder.layers", "text_model.encoder.layers"),
                 "open_clip": ("clip.visual.transformer.resblocks", "clip.transformer.resblocks")}[self.kind]
        found = []
        for path in paths:
            module = self.model
            for name in path.split("."):
                module = getattr(module, name, None)
            if not isinstance(module, torch.nn.ModuleList) or not len(module):
                raise PipelineError(f"{self.name}: {type(self.model).__name__} has no {path} (the transformer blocks "
                                    f"of a tower); {option} needs a CLIP-style tower")
            found.append(module)
        return found[0], found[1]

    @torch.inference_mode()
    def encode_images(self, paths: Sequence[str], batch_size: int = 64, num_workers: int = 0,
                      progress: bool = True) -> np.ndarray:
        chunks = []
        with tqdm(total=len(paths), desc="embed images", unit="img", disable=not progress, leave=False) as bar:
            for pixels, _ in image_batches(paths, self.image_processor, batch_size, num_workers):
                chunks.append(self.image_features(pixels.to(self.device, self.dtype)).cpu().numpy())
                bar.update(len(pixels))
        return np.concatenate(chunks).astype(np.float32)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = True) -> np.ndarray:
        chunks = []
        with tqdm(total=len(texts), desc="embed texts", unit="txt", disable=not progress, leave=False) as bar:
            for s in range(0, len(texts), batch_size):
                tokens = {k: v.to(self.device) for k, v in self.tokenize(texts[s: s + batch_size]).items()}
                chunks.append(self.text_features(tokens).cpu().numpy())
                bar.update(len(texts[s: s + batch_size]))
        return np.concatenate(chunks).astype(np.float32)


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """save_pretrained of a copy without the truncation and padding state its last call left in a fast
    tokenizer's tokenizer.json, so that the saved file does not depend on which batch came last (or, after a
    resume at the end, on none)."""
    import copy

    clean = copy.deepcopy(tokenizer)
    backend = getattr(clean, "backend_tokenizer", None)
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()
    clean.save_pretrained(folder)


def save_pretrained_folder(folder: Path, model: Any, image_processor: Any, tokenizer: Any,
                           extra: Callable[[Path], None] | None = None) -> None:
    """model, image processor and tokenizer (`save_tokenizer`), plus whatever `extra(tmp)` writes, saved into a
    temporary folder that then replaces `folder`: a kill leaves the old folder or the new one, never half of one."""
    import shutil

    tmp = Path(folder).with_name(f".{Path(folder).name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    save_tokenizer(tokenizer, tmp)
    if extra is not None:
        extra(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def write_st_modules(folder: Path, max_length: int) -> None:
    """Files that make a saved dual encoder load with `sentence_transformers.SentenceTransformer(folder)` (5.4 or
    newer): its Transformer module runs get_text_features / get_image_features, then Normalize, so texts and
    (RGB) PIL images embed exactly as DualEncoder does.

    max_length: the text tower's positions; sentence-transformers otherwise truncates at the tokenizer's saved
    max_length, which can exceed them.
    """
    def dump(name: str, obj: Any) -> None:
        (Path(folder) / name).write_text(json.dumps(obj, indent=2) + "\n")

    dump("modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    dump("sentence_bert_config.json", {
        "transformer_task": "feature-extraction",
        "modality_config": {"text": {"method": "get_text_features", "method_output_name": "pooler_output"},
                            "image": {"method": "get_image_features", "method_output_name": "pooler_output"}},
        "module_output_name": "sentence_embedding",
        "processing_kwargs": {"text": {"max_length": max_length}},
        "max_seq_length": max_length,
    })
    dump("config_sentence_transformers.json", {"model_type": "SentenceTransformer", "similarity_fn_name": "cosine",
                                               "prompts": {}, "default_prompt_name": None})


def torch_dtype(name: str, device: str) -> torch.dtype:
    """`auto` = bf16 on a GPU that supports it, else fp32."""
    if name == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
