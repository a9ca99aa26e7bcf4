"""`--loss none`: no distillation term, the student's own contrastive loss alone (the baseline)."""
from __future__ import annotations

from .registry import NoOptions, register

register("none", NoOptions, "contrastive training alone (the baseline)", uses_teacher=False)(None)
