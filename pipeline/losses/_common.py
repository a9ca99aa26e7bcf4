"""Shared checks and reductions for the losses."""
from __future__ import annotations

import torch

# Padded logits are replaced by this (finite, so no NaN reaches a gradient; exp() of it is exactly 0 in fp32).
NEG = -1e9


def check_pair(name: str, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Validate [B, N] student/teacher (and mask) shapes; return the bool mask (all True by default)."""
    if student.dim() != 2:
        raise ValueError(f"{name}: student_logits must be [batch, candidates], got shape {tuple(student.shape)}; "
                         "add a batch dimension with .unsqueeze(0) for a single query")
    if teacher.shape != student.shape:
        raise ValueError(f"{name}: teacher_scores shape {tuple(teacher.shape)} must equal student_logits shape "
                         f"{tuple(student.shape)}: one teacher score per student logit, same order")
    if mask is None:
        return torch.ones_like(student, dtype=torch.bool)
    if mask.shape != student.shape:
        raise ValueError(f"{name}: mask shape {tuple(mask.shape)} must equal student_logits shape "
                         f"{tuple(student.shape)} (True = real candidate, False = padding)")
    return mask.bool()


def mean_over_rows(row_loss: torch.Tensor, keep: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Mean of row_loss over rows where keep is True; zero with a graph through `anchor` if none is."""
    kept = keep.sum()
    if kept == 0:
        return anchor.sum() * 0.0
    return torch.where(keep, row_loss, torch.zeros_like(row_loss)).sum() / kept
