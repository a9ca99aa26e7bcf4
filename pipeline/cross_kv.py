"""BLIP's ITM forward with each image's cross-attention keys and values computed once, not once per pair.

In BLIP's text encoder every layer's cross-attention projects the image's P tokens into keys and values
(2 x P x H x H multiply-adds per layer). transformers' forward does that for every (image, caption) pair; here
it is done once per image of a batch of pairs, and the pairs' queries attend to their image's cached keys and
values. Everything else is the model's own modules (embeddings, projections, output blocks, feed-forward,
ITM head), called in the order of `BlipTextLayer.forward`, so this is an exact rewrite: scores equal the
standard forward to float rounding (tested within 1e-4 in fp32).

Checked against transformers 4.45 to 5.24 (`BlipTextModel`: `embeddings`, `encoder.layer[i].attention.self
.{query,key,value}`, `.attention.output`, `.crossattention.self.{query,key,value}`, `.crossattention.output`,
`.feed_forward_chunk`). `check_structure` refuses any model that differs, naming what it lacks, rather than
computing something else silently.

| function        | input                                                    | output                                |
| --------------- | -------------------------------------------------------- | ------------------------------------- |
| image_kv        | text encoder, image hidden states [N, P, Hv]             | per layer (K, V), each [N, heads, P, d] |
| itm_logodds     | model, per-layer (K, V), image index [B], ids/mask [B, L] | [B] match log-odds                    |
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .errors import PipelineError

_LAYER_PARTS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output",
                "crossattention.self.query", "crossattention.self.key", "crossattention.self.value",
                "crossattention.output", "intermediate", "output")


def check_structure(model: Any) -> None:
    """Raise PipelineError unless `model` (a BlipForImageTextRetrieval) has the modules this rewrite calls."""
    import transformers

    text = getattr(model, "text_encoder", None)
    missing = [] if text is not None else ["text_encoder"]
    if text is not None:
        missing += [p for p in ("embeddings", "encoder.layer") if _get(text, p) is None]
        for i, layer in enumerate(getattr(getattr(text, "encoder", None), "layer", [])):
            missing += [f"encoder.layer[{i}].{p}" for p in _LAYER_PARTS if _get(layer, p) is None]
            if not callable(getattr(layer, "feed_forward_chunk", None)):
                missing.append(f"encoder.layer[{i}].feed_forward_chunk")
        kind = getattr(text.config, "position_embedding_type", "absolute") or "absolute"
        if kind != "absolute":
            missing.append(f"absolute position embeddings (config has {kind})")
    if missing:
        raise PipelineError(f"the cached cross-attention path does not fit this BLIP under transformers "
                            f"{transformers.__version__} (missing: {', '.join(missing[:4])}); "
                            "run score-teacher with --no-kv-cache to use transformers' own forward")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _heads(x: torch.Tensor, attn: Any) -> torch.Tensor:
    """[B, T, H] -> [B, heads, T, d]."""
    return x.view(*x.shape[:2], -1, attn.attention_head_size).transpose(1, 2)


def _merge(ctx: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, d] -> [B, T, heads * d]."""
    return ctx.transpose(1, 2).reshape(ctx.shape[0], ctx.shape[2], -1)


def image_kv(text_encoder: Any, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's cross-attention keys and values of N images: [(K, V)], each [N, heads, P, d]."""
    out = []
    for layer in text_encoder.encoder.layer:
        ca = layer.crossattention.self
        out.append((_heads(ca.key(image_embeds), ca), _heads(ca.value(image_embeds), ca)))
    return out


def _cross(a: torch.Tensor, ca: Any, k: torch.Tensor, v: torch.Tensor, runs: list[tuple[int, int, int]]
           ) -> torch.Tensor:
    """Cross-attention context [B, L, H] of pairs grouped by image: a [B, L, H] the self-attention output; k, v
    [N, heads, P, d]; runs of (image, start, end) over B. The tokens of one image's pairs form one query sequence
    against that image's keys and values (image tokens carry no mask and query rows are independent), so no key
    or value is copied per pair."""
    B, L, H = a.shape
    out = torch.empty_like(a)
    for image, s, e in runs:
        q = _heads(ca.query(a[s:e].reshape(1, (e - s) * L, H)), ca)              # [1, heads, pairs x L, d]
        o = F.scaled_dot_product_attention(q, k[image: image + 1], v[image: image + 1])
        out[s:e] = _merge(o).view(e - s, L, H)
    return out


def by_image(image_index: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """The pairs grouped by image: `order` ([B], stable) and, over the reordered pairs, runs of (image, start,
    end), one per image."""
    order = torch.argsort(image_index, stable=True)
    images, counts = torch.unique_consecutive(image_index[order], return_counts=True)
    ends = torch.cumsum(counts, 0).tolist()
    return order, [(int(i), e - int(c), e) for i, c, e in zip(images, counts, ends)]


def itm_logodds(model: Any, kv: list[tuple[torch.Tensor, torch.Tensor]], image_index: torch.Tensor,
                input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] ITM log-odds of B pairs: caption b against image `image_index[b]` of the cached keys and values."""
    text = model.text_encoder
    order, runs = by_image(image_index)
    input_ids, attention_mask = input_ids[order], attention_mask[order]
    x = text.embeddings(input_ids=input_ids)                                     # [B, L, H]
    # padding keys get the most negative value: softmax gives them exactly 0, as transformers' mask does
    pad = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min    # [B, 1, 1, L]
    for layer, (k_img, v_img) in zip(text.encoder.layer, kv):
        sa = layer.attention.self
        ctx = F.scaled_dot_product_attention(_heads(sa.query(x), sa), _heads(sa.key(x), sa), _heads(sa.value(x), sa),
                                             attn_mask=pad)
        a = layer.attention.output(_merge(ctx), x)
        ca = layer.crossattention.self
        a = layer.crossattention.output(_cross(a, ca, k_img, v_img, runs), a)
        x = layer.feed_forward_chunk(a)
    logits = model.itm_head(x[:, 0, :]).float()                                  # [B, 2]: no match, match
    out = torch.empty_like(logits[:, 0])
    out[order] = logits[:, 1] - logits[:, 0]
    return out
