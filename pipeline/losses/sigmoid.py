"""Pairwise sigmoid loss: SigLIP's own contrastive loss (`distill --contrastive sigmoid`).

The contrastive term, like `itc_loss` beside it, not a distillation loss: it reads the batch's (image, caption)
pairs, never the teacher's lists, so it is not in the registry (importing this module registers nothing).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float,
                 logit_bias: torch.Tensor | float, positive_mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""SigLIP's pairwise loss over a batch of B (image, text) pairs, row i of each being a positive pair:

        L = -(1/B) sum_{i,j} log sigmoid( z_ij * (t * cos(image_i, text_j) + b) )
        z_ij = +1 where image i matches text j (the diagonal), -1 elsewhere

    Every image-text logit is its own binary question, so, unlike the softmax loss, the level of a logit counts:
    the bias b (learned with t) sets where "match" begins. The sum runs over all B*B pairs and is divided by B
    (SigLIP's normalisation), so the value grows with the batch's negatives.

    | input         | shape    | meaning                                                                       |
    | ------------- | -------- | ----------------------------------------------------------------------------- |
    | image_emb     | [B, D]   | image embeddings (normalised here)                                            |
    | text_emb      | [B, D]   | text embeddings (normalised here)                                             |
    | logit_scale   | scalar   | t, already exponentiated (SigLIP: model.logit_scale.exp())                    |
    | logit_bias    | scalar   | b, added after the scale (SigLIP: model.logit_bias; a [1] tensor is accepted) |
    | positive_mask | [B, B]   | optional bool, True where image i matches text j (e.g. two captions of one    |
    |               |          | image in one batch): z_ij = +1 there; the diagonal must be True               |
    """
    if image_emb.dim() != 2 or text_emb.shape != image_emb.shape:
        raise ValueError(f"sigmoid_loss: image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} "
                         "must both be [batch, dim] with row i of each forming a positive pair")
    b = image_emb.shape[0]
    if torch.is_tensor(logit_bias) and logit_bias.numel() != 1:
        raise ValueError(f"sigmoid_loss: logit_bias must be a scalar (or a [1] tensor), got shape "
                         f"{tuple(logit_bias.shape)}")
    if positive_mask is None:
        positive_mask = torch.eye(b, dtype=torch.bool, device=image_emb.device)
    elif positive_mask.shape != (b, b) or not bool(positive_mask.diagonal().all()):
        raise ValueError(f"sigmoid_loss: positive_mask must be [{b}, {b}] with a True diagonal, "
                         f"got {tuple(positive_mask.shape)}")
    bias = logit_bias.reshape(()) if torch.is_tensor(logit_bias) else logit_bias
    logits = logit_scale * F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T + bias
    z = positive_mask.float() * 2 - 1                                   # [B, B]: +1 matches, -1 the rest
    return -F.logsigmoid(z * logits).sum() / b
