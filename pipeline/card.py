"""The model card (README.md) that leaves with a distilled student: where it came from and how well it does.

Front matter in the Hugging Face hub's format (tags, base model, `model-index` with the validation results when
there are any), then the student and the teacher with their identities, the training data, the loss and every
setting, the training length and last loss terms, and how to load it (transformers, sentence-transformers).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml


def describe_model(identity: dict[str, Any], where: Optional[str] = None) -> str:
    """'hub `name` @ revision' or 'local folder `where` (model.safetensors sha256 1234abcd...)': the identity is
    the files' hashes; `where` is the folder they were read from."""
    if "hub" in identity:
        return f"hub `{identity['hub']}` @ `{identity.get('revision') or 'main'}`"
    if "open_clip" in identity:   # open_clip:ARCH@WEIGHTS (pipeline.openclip.identity)
        return f"open_clip `{identity['open_clip']}` with `{where}` (sha256 `{identity['weights'][:16]}…`)"
    files = identity.get("files", {})
    weights = next((f for f in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")
                    if f in files), None)
    digest = f" ({weights} sha256 `{files[weights][:16]}…`)" if weights else ""
    return f"local folder `{where or identity.get('path')}`{digest}"


def _metric_rows(val: dict[str, float]) -> list[dict[str, Any]]:
    return [{"type": k.removeprefix("val_"), "value": round(float(v), 4)} for k, v in val.items()]


def model_card(*, title: str, config: dict[str, Any], student: dict[str, Any], teacher: dict[str, Any],
               mine: dict[str, Any], steps: int, last: dict[str, Any], val: Optional[dict[str, float]] = None,
               val_step: Optional[int] = None, which: str = "final", val_split: Optional[str] = None) -> str:
    """config: the distill config's fingerprinted part (what defines the weights); student/teacher: model identities; mine/teacher: those manifests'
    `config`; last: the last metrics.jsonl row; val: the validation row of this checkpoint, if validated;
    val_split: the split validated on (the fingerprinted config leaves out a split left at its default)."""
    val_split = val_split or config.get("val_split")
    front: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "feature-extraction",
                             "tags": ["cprd-pipeline", "image-text-retrieval", "knowledge-distillation",
                                      "dual-encoder", "sentence-transformers"]}
    if "hub" in student:
        front["base_model"] = student["hub"]
    if val:
        front["model-index"] = [{"name": title, "results": [{
            "task": {"type": "image-text-retrieval", "name": "image-text retrieval"},
            "dataset": {"name": str(config.get("val_data")), "type": "validation",
                        "split": str(val_split)},
            "metrics": _metric_rows(val)}]}]
    loss = config.get("loss")
    terms = ", ".join(f"{k} {v:.4f}" for k, v in last.items()
                      if k not in ("step", "epoch", "lr", "logit_scale", "false_negatives", "dropped_by_margin")
                      and isinstance(v, (int, float)) and not k.startswith("val_"))
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
        f"# {title}", "",
        f"A dual-encoder student ({which} weights after {steps} optimizer steps) distilled from a cross-encoder "
        "teacher with cprd-pipeline: the contrastive loss on query-positive pairs plus "
        f"{config.get('distill_weight')} x `{loss}` over each query's teacher-ranked hard negatives.", "",
        "## Models", "",
        f"- student (the starting point): {describe_model(student, config.get('student'))}",
        f"- teacher: {describe_model(teacher.get('identity', {}), teacher.get('teacher'))}, score `{teacher.get('score')}`"
        + (f" (ITC weight {teacher.get('itc_weight')})" if teacher.get("score") == "itm+itc" else ""), "",
        "## Data", "",
        f"- training corpus: `{mine.get('data')}`" + (f", split `{mine['split']}`" if mine.get("split") else "")
        + f"; top-{mine.get('k')} hard negatives per query mined by the student, "
          f"{config.get('num_negatives')} used per query", "",
        "## Loss and settings", "",
        "```yaml", yaml.safe_dump({k: v for k, v in config.items() if v is not None}, sort_keys=False).rstrip(), "```",
        "",
        "## Training", "",
        f"- {steps} optimizer steps; loss terms at step {last.get('step')}: {terms}",
        f"- learning rate at the end {last.get('lr', float('nan')):.3g}, logit scale {last.get('logit_scale', 0):.3f}", "",
    ]
    lines += ["## Evaluation", ""]
    if val:
        lines += [f"Validation on `{config.get('val_data')}` (split `{val_split}`) at step {val_step}"
                  + (" (the best validation RSUM of the run)" if which == "best" else "") + ":", "",
                  "| metric | value |", "| --- | --- |"]
        lines += [f"| {k.removeprefix('val_')} | {v:.3f} |" for k, v in val.items()]
    else:
        lines += ["No validation during training (`distill --val-data ... --eval-every N`). Test results: "
                  "`cprd-pipeline evaluate --run RUN --data TEST` writes `RUN/eval/metrics.json`."]
    lines += ["", "## Use", "", "```python",
              "from transformers import AutoImageProcessor, AutoModel, AutoTokenizer",
              "model = AutoModel.from_pretrained(PATH)            # get_text_features / get_image_features",
              "tokenizer, image_processor = AutoTokenizer.from_pretrained(PATH), AutoImageProcessor.from_pretrained(PATH)",
              "", "# or, with sentence-transformers installed: L2-normalised embeddings of texts and PIL images",
              "from sentence_transformers import SentenceTransformer",
              "st = SentenceTransformer(PATH)",
              "text_emb, image_emb = st.encode([\"a red circle\"]), st.encode([pil_image])", "```", ""]
    return "\n".join(lines)


def write_card(folder: Path, **kwargs: Any) -> None:
    (Path(folder) / "README.md").write_text(model_card(**kwargs))
