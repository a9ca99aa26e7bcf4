"""Cross-encoder teachers behind one small interface.

A teacher scores (image, text) pairs as raw match log-odds. Its image side runs once per unique image
(`encode_images`); the result is indexed per pair and reused for every text paired with that image
(`score`). Adding a cross-encoder is one more subclass.

| class                          | image state (once per image)         | pair score                              |
| ------------------------------ | ------------------------------------ | --------------------------------------- |
| BlipForImageTextRetrieval      | vision tower hidden states [N, P, H] | ITM logit[match] - logit[no match]      |
| ViltForImageAndTextRetrieval   | patch embeddings + mask [N, P, H]    | the single retrieval logit              |
| Blip2ForImageTextRetrieval     | vision tower hidden states [N, P, H] | Q-Former ITM logit[match] - logit[no match], mean over the query tokens |
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import cross_kv, qformer_kv
from .errors import PipelineError
from .models import _pretrained, image_batches, load_processors


class CrossEncoder:
    """Interface. `image_state` is a tuple of tensors whose first dimension is the image."""

    head: str = ""

    def __init__(self, model: Any, image_processor: Any, tokenizer: Any, device: str, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.device, self.dtype = device, dtype
        self.max_length = int(getattr(self.text_config(model.config), "max_position_embeddings", 512))

    @staticmethod
    def text_config(config: Any) -> Any:
        """The config of the tower that reads the caption (its vocabulary and positions)."""
        return getattr(config, "text_config", config)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return {k: v.to(self.device) for k, v in tokens.items()}

    def encode_images(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def score(self, image_state: tuple[torch.Tensor, ...], tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B] float32 match log-odds for B pairs (image_state already gathered per pair)."""
        raise NotImplementedError

    def score_indexed(self, image_state: tuple[torch.Tensor, ...], image_index: torch.Tensor,
                      tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B] match log-odds of B pairs, pair b using image `image_index[b]` of a group's image state."""
        return self.score(tuple(t[image_index] for t in image_state), tokens)

    # The contrastive (ITC) score is a similarity of two features computed apart: an image's [N, Q, D] (Q = 1
    # but for BLIP-2's query tokens) and a caption's [B, D], both L2-normalised; the score is the best cosine
    # over Q. Each side is encoded once however many pairs it is in (score_pairs).
    def itc_image_features(self, image_state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise PipelineError(f"{type(self.model).__name__} has no contrastive (ITC) head; use --score itm")

    def itc_text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        raise PipelineError(f"{type(self.model).__name__} has no contrastive (ITC) head; use --score itm")

    @staticmethod
    def itc_of(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """[B] cosines of B pairs from their features, [B, Q, D] and [B, D]: the best over the image's Q."""
        return (image_features * text_features[:, None, :]).sum(-1).amax(1)

    def itc_indexed(self, image_state: tuple[torch.Tensor, ...], image_index: torch.Tensor,
                    tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B] ITC cosines of B pairs, pair b using image `image_index[b]` of a group's image state."""
        images, per_pair = torch.unique(image_index, return_inverse=True)   # each image's features once
        img = self.itc_image_features(tuple(t[images] for t in image_state))
        return self.itc_of(img[per_pair], self.itc_text_features(tokens))

    def itc(self, image_state: tuple[torch.Tensor, ...], tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B] ITC cosines of B pairs (image_state already gathered per pair)."""
        return self.itc_indexed(image_state, torch.arange(image_state[0].shape[0], device=image_state[0].device),
                                tokens)


def blip_itm_logodds(model: Any, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] match log-odds of BLIP's ITM head for B (image hidden states [B, P, H], caption) pairs."""
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    hidden = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
    logits = model.itm_head(hidden.last_hidden_state[:, 0, :]).float()  # [B, 2]: no match, match
    return logits[:, 1] - logits[:, 0]


def blip_itc_image(model: Any, image_embeds: torch.Tensor) -> torch.Tensor:
    """BLIP's contrastive image features [N, D], L2-normalised: the projected [CLS] of the vision tower."""
    return torch.nn.functional.normalize(model.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)


def blip_itc_text(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """BLIP's contrastive caption features [B, D], L2-normalised: the projected [CLS] of the caption encoded
    without the image."""
    text = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
    return torch.nn.functional.normalize(model.text_proj(text.last_hidden_state[:, 0, :]).float(), dim=-1)


def blip_itc_features(model: Any, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's contrastive features of B pairs, [B, D] each (blip_itc_image, blip_itc_text)."""
    return blip_itc_image(model, image_embeds), blip_itc_text(model, input_ids, attention_mask)


class BlipITM(CrossEncoder):
    """With `kv_cache` (the default), the cross-attention keys and values of each image of a batch of pairs are
    computed once (`pipeline/cross_kv.py`) instead of once per pair."""

    head = "itm_head"
    kv_cache = True

    def score_indexed(self, image_state, image_index, tokens):
        if not self.kv_cache:
            return super().score_indexed(image_state, image_index, tokens)
        (image_embeds,) = image_state
        images, per_pair = torch.unique(image_index, return_inverse=True)  # the batch's own images only
        kv = cross_kv.image_kv(self.model.text_encoder, image_embeds[images])
        return cross_kv.itm_logodds(self.model, kv, per_pair, tokens["input_ids"], tokens["attention_mask"])

    def encode_images(self, pixel_values, pixel_mask):
        return (self.model.vision_model(pixel_values=pixel_values.to(self.device, self.dtype)).last_hidden_state,)

    def score(self, image_state, tokens):
        (image_embeds,) = image_state
        return blip_itm_logodds(self.model, image_embeds, tokens["input_ids"], tokens["attention_mask"])

    def itc_image_features(self, image_state):
        (image_embeds,) = image_state
        return blip_itc_image(self.model, image_embeds)[:, None, :]

    def itc_text_features(self, tokens):
        return blip_itc_text(self.model, tokens["input_ids"], tokens["attention_mask"])


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


def blip2_itm_logodds(model: Any, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] match log-odds of BLIP-2's ITM head for B (vision hidden states [B, P, H], caption) pairs: the
    Q-Former reads the query tokens and the caption together, the query tokens attend to the image, and the
    head's two logits are averaged over the query positions (as `Blip2ForImageTextRetrieval` does)."""
    b = image_embeds.shape[0]
    queries = model.query_tokens.expand(b, -1, -1)
    mask = torch.cat([torch.ones(queries.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device),
                      attention_mask], 1)
    hidden = model.qformer(query_embeds=model.embeddings(input_ids=input_ids, query_embeds=queries),
                           query_length=queries.shape[1], attention_mask=mask, encoder_hidden_states=image_embeds,
                           encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long,
                                                             device=image_embeds.device)).last_hidden_state
    head = model.itm_head
    logits = head(hidden[:, :queries.shape[1]].to(head.weight.dtype)).mean(1).float()   # [B, 2]: no match, match
    return logits[:, 1] - logits[:, 0]


def blip2_itc_image(model: Any, image_embeds: torch.Tensor) -> torch.Tensor:
    """BLIP-2's contrastive image features [N, Q, D], L2-normalised: the projected query tokens of the Q-Former
    over the image alone."""
    queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    img = model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long,
                                                          device=image_embeds.device)).last_hidden_state
    return torch.nn.functional.normalize(
        model.vision_projection(img.to(model.vision_projection.weight.dtype)).float(), dim=-1)


def blip2_itc_text(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """BLIP-2's contrastive caption features [B, D], L2-normalised: the projected [CLS] of the Q-Former over the
    text alone."""
    txt = model.qformer(query_embeds=model.embeddings(input_ids=input_ids), query_length=0,
                        attention_mask=attention_mask).last_hidden_state[:, 0]
    return torch.nn.functional.normalize(
        model.text_projection(txt.to(model.text_projection.weight.dtype)).float(), dim=-1)


class Blip2ITM(CrossEncoder):
    """BLIP-2's Q-Former matching head (`Blip2ForImageTextRetrieval`, e.g. Salesforce/blip2-itm-vit-g). The
    vision tower runs once per image; with `kv_cache` (the default) so do the Q-Former's cross-attention keys and
    values (`pipeline/qformer_kv.py`). The Q-Former, its query tokens and the heads stay in fp32 whatever
    --dtype says, as transformers keeps them; --dtype applies to the vision tower."""

    head = "itm_head"
    kv_cache = True

    def __init__(self, model: Any, image_processor: Any, tokenizer: Any, device: str, dtype: torch.dtype):
        super().__init__(model, image_processor, tokenizer, device, dtype)
        for name, module in self.model.named_children():
            if name != "vision_model":
                module.float()
        self.model.query_tokens.data = self.model.query_tokens.data.float()

    @staticmethod
    def text_config(config: Any) -> Any:
        return config.qformer_config   # text_config is the language model's, which retrieval does not have

    def encode_images(self, pixel_values, pixel_mask):
        return (self.model.vision_model(pixel_values=pixel_values.to(self.device, self.dtype)).last_hidden_state,)

    def score(self, image_state, tokens):
        (image_embeds,) = image_state
        return blip2_itm_logodds(self.model, image_embeds.float(), tokens["input_ids"], tokens["attention_mask"])

    def score_indexed(self, image_state, image_index, tokens):
        if not self.kv_cache:
            return super().score_indexed(image_state, image_index, tokens)
        (image_embeds,) = image_state
        images, per_pair = torch.unique(image_index, return_inverse=True)   # the batch's own images only
        kv = qformer_kv.image_kv(self.model, image_embeds[images])
        return qformer_kv.itm_logodds(self.model, kv, per_pair, tokens["input_ids"], tokens["attention_mask"])

    def itc_image_features(self, image_state):
        (image_embeds,) = image_state
        return blip2_itc_image(self.model, image_embeds.float())

    def itc_text_features(self, tokens):
        return blip2_itc_text(self.model, tokens["input_ids"], tokens["attention_mask"])


ADAPTERS = {"blip": ("BlipForImageTextRetrieval", BlipITM), "vilt": ("ViltForImageAndTextRetrieval", ViltRetrieval),
            "blip-2": ("Blip2ForImageTextRetrieval", Blip2ITM)}


def load_teacher(name_or_path: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 revision: str | None = None, trust_remote_code: bool = False, kv_cache: bool = True) -> CrossEncoder:
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
    vocab = getattr(adapter.text_config(config), "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise PipelineError(f"{name_or_path}: tokenizer has {len(tokenizer)} tokens but the model's text "
                            f"embeddings have {vocab}: the tokenizer does not belong to this model")
    teacher = adapter(model, image_processor, tokenizer, device, dtype)
    if isinstance(teacher, (BlipITM, Blip2ITM)):
        if kv_cache:
            (cross_kv if isinstance(teacher, BlipITM) else qformer_kv).check_structure(model)
        teacher.kv_cache = kv_cache
    return teacher


def resolve_teacher(teacher: str, run: Path) -> tuple[str, dict[str, Any] | None]:
    """(the folder or hub name to load, its lineage) for score-teacher's --teacher.

    `train-teacher` names RUN/teacher-train/final; any `final/` folder of a complete train-teacher output is
    recognised as one. The lineage (that output's fingerprint and the teacher it started from) goes into the
    scoring stage's identity.
    """
    from .artifacts import read_json, require_complete
    from .layout import Run

    path = Path(teacher)
    if teacher == "train-teacher":
        path = Run(run).train_teacher / "final"
        require_complete(path.parent, "train-teacher", f"run `cprd-pipeline train-teacher --run {run} ...` first")
    manifest = read_json(path.parent / "manifest.json") if path.name == "final" else None
    if manifest is None or manifest.get("stage") != "train-teacher":
        return teacher, None
    m = require_complete(path.parent, "train-teacher", "rerun train-teacher to finish it")
    return str(path), {"stage": "train-teacher", "fingerprint": m["fingerprint"], "base": m["identity"]["teacher"],
                       "output": str(path.parent.resolve())}


@torch.inference_mode()
def itc_texts(teacher: CrossEncoder, corpus: Any, txt_rows: np.ndarray, batch_size: int = 256
              ) -> tuple[np.ndarray, torch.Tensor]:
    """(the unique caption rows [U] sorted, their ITC features [U, D]): each caption encoded once, shortest
    first so a batch pads little."""
    texts = np.unique(txt_rows)
    lengths = np.fromiter((len(corpus.texts[t]) for t in texts), dtype=np.int64, count=len(texts))
    order = np.argsort(lengths, kind="stable")
    features = torch.empty(0, 1, device=teacher.device)   # stays empty without pairs
    for s in range(0, len(texts), batch_size):
        part = order[s: s + batch_size]
        out = teacher.itc_text_features(teacher.tokenize([corpus.texts[t] for t in texts[part]]))
        if s == 0:
            features = out.new_empty(len(texts), out.shape[-1])
        features[torch.from_numpy(part).to(out.device)] = out
    return texts, features


@torch.inference_mode()
def score_pairs(teacher: CrossEncoder, corpus: Any, img_rows: np.ndarray, txt_rows: np.ndarray, batch_size: int = 256,
                image_batch_size: int = 64, num_workers: int = 0, itc_weight: float = 0.0, bar: Any = None
                ) -> np.ndarray:
    """Scores [P] of P pairs given as corpus rows, which must be sorted by image row.

    One loader decodes the unique images in order, `image_batch_size` at a time, and each image's state is
    computed once (`encode_images`); the pairs of those images then run through the text/cross side in batches
    of `batch_size` (`score_indexed`, each pair naming its image in the group). Within an image, pairs go
    shortest caption first, so a batch pads little. With itc_weight > 0 the score is ITM log-odds +
    itc_weight x ITC cosine; ITC's caption side does not see the image, so each unique caption is encoded once
    (`itc_texts`), as is each image group's side. A non-finite score is an error naming the pair.
    """
    if len(img_rows) and (np.diff(img_rows) < 0).any():
        raise ValueError("score_pairs: pairs must be sorted by image row")
    scores = np.empty(len(img_rows), dtype=np.float32)
    images = np.unique(img_rows)
    starts = np.searchsorted(img_rows, images)
    ends = np.searchsorted(img_rows, images, side="right")
    # within each image, shortest caption first (a stable order: by image, then length)
    lengths = np.fromiter((len(corpus.texts[t]) for t in txt_rows), dtype=np.int64, count=len(txt_rows))
    order = np.lexsort((lengths, img_rows))
    if itc_weight:
        texts, text_features = itc_texts(teacher, corpus, txt_rows, batch_size)
    loader = image_batches([corpus.image_paths[i] for i in images], teacher.image_processor, image_batch_size,
                           num_workers)
    for b, (pixels, mask) in zip(range(0, len(images), image_batch_size), loader):
        group = images[b: b + image_batch_size]
        state = teacher.encode_images(pixels, mask)
        if itc_weight:
            image_features = teacher.itc_image_features(state)   # [G, Q, D]
        lo, hi = starts[b], ends[b + len(group) - 1]
        for s in range(lo, hi, batch_size):
            pairs = order[s: min(hi, s + batch_size)]
            idx = torch.from_numpy(np.searchsorted(group, img_rows[pairs])).to(teacher.device)  # pair -> group image
            tokens = teacher.tokenize([corpus.texts[t] for t in txt_rows[pairs]])
            out = teacher.score_indexed(state, idx, tokens)
            if itc_weight:
                text = torch.from_numpy(np.searchsorted(texts, txt_rows[pairs])).to(teacher.device)
                out = out + itc_weight * teacher.itc_of(image_features[idx], text_features[text])
            out = out.float().cpu().numpy()
            bad = np.flatnonzero(~np.isfinite(out))
            if len(bad):
                i = pairs[bad[0]]
                raise PipelineError(f"non-finite teacher score {out[bad[0]]} for pair (image "
                                    f"'{corpus.image_ids[img_rows[i]]}', text '{corpus.text_ids[txt_rows[i]]}')")
            scores[pairs] = out
            if bar is not None:
                bar.update(len(pairs))
    return scores
