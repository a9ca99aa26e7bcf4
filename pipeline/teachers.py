"""Cross-encoder teachers behind one small interface.

A teacher scores (image, text) pairs as raw match log-odds. Its image side runs once per unique image
(`encode_images`); the result is indexed per pair and reused for every text paired with that image
(`score`). Adding a cross-encoder is one more subclass.

| class                          | image state (once per image)         | pair score                              |
| ------------------------------ | ------------------------------------ | --------------------------------------- |
| BlipForImageTextRetrieval      | vision tower hidden states [N, P, H] | ITM logit[match] - logit[no match]      |
| ViltForImageAndTextRetrieval   | patch embeddings + mask [N, P, H]    | the single retrieval logit              |
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import PipelineError
from .models import _pretrained, image_batches, load_processors


class CrossEncoder:
    """Interface. `image_state` is a tuple of tensors whose first dimension is the image."""

    head: str = ""

    def __init__(self, model: Any, image_processor: Any, tokenizer: Any, device: str, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.device, self.dtype = device, dtype
        text_cfg = getattr(model.config, "text_config", model.config)
        self.max_length = int(getattr(text_cfg, "max_position_embeddings", 512))

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return {k: v.to(self.device) for k, v in tokens.items()}

    def encode_images(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def score(self, image_state: tuple[torch.Tensor, ...], tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B] float32 match log-odds for B pairs (image_state already gathered per pair)."""
        raise NotImplementedError

    def itc(self, image_state: tuple[torch.Tensor, ...], tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        raise PipelineError(f"{type(self.model).__name__} has no contrastive (ITC) head; use --score itm")


def blip_itm_logodds(model: Any, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] match log-odds of BLIP's ITM head for B (image hidden states [B, P, H], caption) pairs."""
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    hidden = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
    logits = model.itm_head(hidden.last_hidden_state[:, 0, :]).float()  # [B, 2]: no match, match
    return logits[:, 1] - logits[:, 0]


def blip_itc_features(model: Any, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's contrastive features, L2-normalised: the projected [CLS] of the image and of the caption (encoded
    without the image), [B, D] each."""
    text = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
    img = torch.nn.functional.normalize(model.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)
    txt = torch.nn.functional.normalize(model.text_proj(text.last_hidden_state[:, 0, :]).float(), dim=-1)
    return img, txt


class BlipITM(CrossEncoder):
    head = "itm_head"

    def encode_images(self, pixel_values, pixel_mask):
        return (self.model.vision_model(pixel_values=pixel_values.to(self.device, self.dtype)).last_hidden_state,)

    def score(self, image_state, tokens):
        (image_embeds,) = image_state
        return blip_itm_logodds(self.model, image_embeds, tokens["input_ids"], tokens["attention_mask"])

    def itc(self, image_state, tokens):
        """BLIP's contrastive similarity: cosine of the projected [CLS] features (text encoded without image)."""
        (image_embeds,) = image_state
        img, txt = blip_itc_features(self.model, image_embeds, tokens["input_ids"], tokens["attention_mask"])
        return (img * txt).sum(-1)


class ViltRetrieval(CrossEncoder):
    head = "rank_output"

    def encode_images(self, pixel_values, pixel_mask):
        embeds, masks, _ = self.model.vilt.embeddings.visual_embed(
            pixel_values.to(self.device, self.dtype), pixel_mask.to(self.device),
            max_image_length=self.model.config.max_image_length)
        return embeds, masks

    def score(self, image_state, tokens):
        embeds, masks = image_state
        out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                         token_type_ids=tokens.get("token_type_ids"), image_embeds=embeds, pixel_mask=masks)
        return out.logits[:, 0].float()


ADAPTERS = {"blip": ("BlipForImageTextRetrieval", BlipITM), "vilt": ("ViltForImageAndTextRetrieval", ViltRetrieval)}


def load_teacher(name_or_path: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 revision: str | None = None, trust_remote_code: bool = False) -> CrossEncoder:
    import transformers

    config = _pretrained(transformers.AutoConfig.from_pretrained, name_or_path, "config",
                         revision=revision, trust_remote_code=trust_remote_code)
    if config.model_type not in ADAPTERS:
        raise PipelineError(f"{name_or_path}: model type '{config.model_type}' is not a supported cross-encoder "
                            f"(supported: {', '.join(ADAPTERS)})")
    class_name, adapter = ADAPTERS[config.model_type]
    image_processor, tokenizer = load_processors(name_or_path, revision, trust_remote_code)
    model, info = _pretrained(getattr(transformers, class_name).from_pretrained, name_or_path, "model weights",
                              revision=revision, trust_remote_code=trust_remote_code, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if k.startswith(adapter.head)]
    if missing:
        raise PipelineError(f"{name_or_path}: checkpoint has no trained matching head ({adapter.head} missing); "
                            f"it cannot score pairs as {class_name}")
    vocab = getattr(getattr(config, "text_config", config), "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise PipelineError(f"{name_or_path}: tokenizer has {len(tokenizer)} tokens but the model's text "
                            f"embeddings have {vocab}: the tokenizer does not belong to this model")
    return adapter(model, image_processor, tokenizer, device, dtype)


@torch.inference_mode()
def score_pairs(teacher: CrossEncoder, corpus: Any, img_rows: np.ndarray, txt_rows: np.ndarray, batch_size: int = 256,
                image_batch_size: int = 64, num_workers: int = 0, itc_weight: float = 0.0, bar: Any = None
                ) -> np.ndarray:
    """Scores [P] of P pairs given as corpus rows, which must be sorted by image row.

    Images are loaded and encoded `image_batch_size` at a time, once each; the pairs of those images then
    run through the text/cross side in batches of `batch_size`, each gathering its images' state.
    With itc_weight > 0 the score is ITM log-odds + itc_weight x ITC cosine. A non-finite score is an error
    naming the pair.
    """
    if len(img_rows) and (np.diff(img_rows) < 0).any():
        raise ValueError("score_pairs: pairs must be sorted by image row")
    scores = np.empty(len(img_rows), dtype=np.float32)
    images = np.unique(img_rows)
    starts = np.searchsorted(img_rows, images)
    ends = np.searchsorted(img_rows, images, side="right")
    for b in range(0, len(images), image_batch_size):
        group = images[b: b + image_batch_size]
        ((pixels, mask),) = list(image_batches([corpus.image_paths[i] for i in group], teacher.image_processor,
                                               len(group), num_workers))
        state = teacher.encode_images(pixels, mask)
        lo, hi = starts[b], ends[b + len(group) - 1]
        local = np.searchsorted(group, img_rows[lo:hi])  # pair -> its image's index in this group
        for s in range(lo, hi, batch_size):
            e = min(hi, s + batch_size)
            idx = torch.from_numpy(local[s - lo: e - lo]).to(teacher.device)
            per_pair = tuple(t[idx] for t in state)
            tokens = teacher.tokenize([corpus.texts[t] for t in txt_rows[s:e]])
            out = teacher.score(per_pair, tokens)
            if itc_weight:
                out = out + itc_weight * teacher.itc(per_pair, tokens)
            out = out.float().cpu().numpy()
            bad = np.flatnonzero(~np.isfinite(out))
            if len(bad):
                i = s + bad[0]
                raise PipelineError(f"non-finite teacher score {out[bad[0]]} for pair (image "
                                    f"'{corpus.image_ids[img_rows[i]]}', text '{corpus.text_ids[txt_rows[i]]}')")
            scores[s:e] = out
            if bar is not None:
                bar.update(e - s)
    return scores
