"""Training helpers shared by every loop that trains a model here (distill, train-teacher, the demo's own models)."""
from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier at optimizer step `step` (0-based): linear warm-up over `warmup_steps`, then a cosine
    decay to zero at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def ramped_cosine_lr(base: float, step: int, total_steps: int, warmup_steps: int) -> float:
    """The learning rate at step `step` (0-based) of the demo models' recipe: a linear ramp over `warmup_steps`
    multiplying a cosine decay over all `total_steps` (the two overlap, unlike `warmup_cosine`)."""
    return base * min(1.0, (step + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total_steps)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases, norms, embeddings and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def backward_step(acc, model: torch.nn.Module, optimizer, terms: dict[str, torch.Tensor], step: int,
                  max_grad_norm: float) -> None:
    """Inside `acc.accumulate(model)`: refuse a non-finite term (naming the step), backward the summed `loss`,
    clip when the accumulation completes, step the optimizer (Accelerate skips it until then)."""
    from .errors import PipelineError

    if not all(torch.isfinite(v) for v in terms.values()):
        bad = ", ".join(f"{k}={float(v.detach())}" for k, v in terms.items())
        raise PipelineError(f"non-finite loss at step {step} ({bad}); lower --lr or use --mixed-precision no")
    acc.backward(terms["loss"])
    if acc.sync_gradients and max_grad_norm > 0:
        acc.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()
