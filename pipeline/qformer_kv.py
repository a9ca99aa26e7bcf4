"""BLIP-2's ITM forward with each image's cross-attention keys and values computed once, not once per pair.

In BLIP-2's Q-Former the learned query tokens attend to the image's P vision tokens in every
`cross_attention_frequency`-th layer, projecting them into keys and values (2 x P x Hv x H multiply-adds per
such layer; for the public ITM checkpoint P = 257, Hv = 1408, H = 768, six such layers: about a third of a
pair's Q-Former work). transformers' forward does that for every (image, caption) pair; here it is done once
per image of a batch of pairs, and the pairs' query tokens attend to their image's cached keys and values.
Everything else is the model's own modules (embeddings, layer norm, projections, output blocks, both
feed-forward chunks, ITM head), called in the order of `Blip2QFormerLayer.forward`, so this is an exact
rewrite: scores equal `Blip2ForImageTextRetrieval(..., use_image_text_matching_head=True)` to float rounding
(tested within 1e-4 in fp32). The last layer's text feed-forward is skipped: ITM reads the query positions only.

Checked against transformers 5.25 (`Blip2QFormerModel`: `layernorm`, `encoder.layer[i].attention.attention
.{query,key,value}`, `.attention.output`, `.crossattention.attention.{key,value,query}`, `.crossattention
.output`, `.feed_forward_chunk`, `.feed_forward_chunk_query`, `.has_cross_attention`). `check_structure` refuses
any model that differs, naming what it lacks, rather than computing something else silently.

| function        | input                                                        | output                               |
| --------------- | ------------------------------------------------------------ | ------------------------------------ |
| image_kv        | model, vision hidden states [N, P, Hv]                       | {layer: (K, V)}, each [N, heads, P, d] |
| itm_logodds     | model, that dict, image index [B], ids / mask [B, L]         | [B] match log-odds                   |
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .cross_kv import _cross, _get, _heads, _merge, by_image
from .errors import PipelineError

_MODEL_PARTS = ("query_tokens", "embeddings", "qformer.layernorm", "qformer.encoder.layer", "itm_head")
_LAYER_PARTS = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                "attention.output")
_CROSS_PARTS = ("crossattention.attention.query", "crossattention.attention.key", "crossattention.attention.value",
                "crossattention.output")


def check_structure(model: Any) -> None:
    """Raise PipelineError unless `model` (a Blip2ForImageTextRetrieval) has the modules this rewrite calls."""
    import transformers

    missing = [p for p in _MODEL_PARTS if _get(model, p) is None]
    for i, layer in enumerate(_get(model, "qformer.encoder.layer") or []):
        cross = getattr(layer, "has_cross_attention", None)
        if cross is None:
            missing.append(f"qformer.encoder.layer[{i}].has_cross_attention")
        parts = _LAYER_PARTS + (_CROSS_PARTS if cross else ())
        missing += [f"qformer.encoder.layer[{i}].{p}" for p in parts if _get(layer, p) is None]
        for fn in ("feed_forward_chunk", "feed_forward_chunk_query"):
            if not callable(getattr(layer, fn, None)) or (fn == "feed_forward_chunk" and _get(layer, "intermediate")
                                                           is None):
                missing.append(f"qformer.encoder.layer[{i}].{fn}")
    if missing:
        raise PipelineError(f"the cached cross-attention path does not fit this BLIP-2 under transformers "
                            f"{transformers.__version__} (missing: {', '.join(missing[:4])}); "
                            "run score-teacher with --no-kv-cache to use transformers' own forward")


def image_kv(model: Any, image_embeds: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The cross-attention keys and values of N images, per cross-attention layer: {i: (K, V)}, [N, heads, P, d].
    The Q-Former runs in its own dtype (transformers keeps it in fp32); the vision states are cast to it."""
    x = image_embeds.to(model.qformer.layernorm.weight.dtype)
    out = {}
    for i, layer in enumerate(model.qformer.encoder.layer):
        if layer.has_cross_attention:
            ca = layer.crossattention.attention
            out[i] = (_heads(ca.key(x), ca), _heads(ca.value(x), ca))
    return out


def itm_logodds(model: Any, kv: dict[int, tuple[torch.Tensor, torch.Tensor]], image_index: torch.Tensor,
                input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] ITM log-odds of B pairs: caption b against image `image_index[b]` of the cached keys and values."""
    qf = model.qformer
    order, runs = by_image(image_index)
    input_ids, attention_mask = input_ids[order], attention_mask[order]
    b, q = input_ids.shape[0], model.query_tokens.shape[1]
    x = model.embeddings(input_ids=input_ids, query_embeds=model.query_tokens.expand(b, -1, -1))  # [B, Q + L, H]
    x = qf.layernorm(x.to(qf.layernorm.weight.dtype))
    mask = torch.cat([torch.ones(b, q, dtype=attention_mask.dtype, device=attention_mask.device), attention_mask], 1)
    # padding keys get the most negative value: softmax gives them exactly 0, as transformers' mask does
    pad = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min    # [B, 1, 1, Q + L]
    layers = list(qf.encoder.layer)
    for i, layer in enumerate(layers):
        sa = layer.attention.attention
        ctx = F.scaled_dot_product_attention(_heads(sa.query(x), sa), _heads(sa.key(x), sa), _heads(sa.value(x), sa),
                                             attn_mask=pad)
        a = layer.attention.output(_merge(ctx), x)                                # [B, Q + L, H]
        queries = a[:, :q]
        if layer.has_cross_attention:
            ca = layer.crossattention
            queries = ca.output(_cross(queries, ca.attention, *kv[i], runs), queries)
        queries = layer.feed_forward_chunk_query(queries)
        last = i == len(layers) - 1
        x = queries if last else torch.cat([queries, layer.feed_forward_chunk(a[:, q:])], 1)
    logits = model.itm_head(x[:, :q].to(model.itm_head.weight.dtype)).mean(1).float()   # [B, 2]: no match, match
    out = torch.empty_like(logits[:, 0])
    out[order] = logits[:, 1] - logits[:, 0]
    return out
