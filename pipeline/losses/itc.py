"""Symmetric InfoNCE: the dual encoder's own contrastive loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def itc_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float,
             positive_mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Contrastive loss over a batch of B (image, text) pairs, row i of each being a positive pair.

        L = ( CE(logits, targets) over image rows + CE(logits^T, targets^T) over text rows ) / 2
        logits[i, j] = logit_scale * cos(image_i, text_j)

    With `positive_mask`, pairs known to match (e.g. two captions of the same image in one batch) are not
    treated as negatives: each row's target spreads uniformly over its positives (soft targets).

    | input         | shape    | meaning                                                         |
    | ------------- | -------- | --------------------------------------------------------------- |
    | image_emb     | [B, D]   | image embeddings (normalised here)                              |
    | text_emb      | [B, D]   | text embeddings (normalised here)                               |
    | logit_scale   | scalar   | the multiplier, already exponentiated (CLIP: model.logit_scale.exp()) |
    | positive_mask | [B, B]   | optional bool, True where image i matches text j; diagonal must be True |
    """
    if image_emb.dim() != 2 or text_emb.shape != image_emb.shape:
        raise ValueError(f"itc_loss: image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} must both "
                         "be [batch, dim] with row i of each forming a positive pair")
    logits = logit_scale * F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T
    b = logits.shape[0]
    if positive_mask is None:
        targets = torch.arange(b, device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    if positive_mask.shape != (b, b) or not bool(positive_mask.diagonal().all()):
        raise ValueError(f"itc_loss: positive_mask must be [{b}, {b}] with a True diagonal, "
                         f"got {tuple(positive_mask.shape)}")
    pm = positive_mask.float()
    rows = pm / pm.sum(1, keepdim=True)
    cols = pm.T / pm.T.sum(1, keepdim=True)
    return (F.cross_entropy(logits, rows) + F.cross_entropy(logits.T, cols)) / 2
