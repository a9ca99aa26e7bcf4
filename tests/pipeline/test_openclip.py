"""open_clip students: our encoder embeds as open_clip does, the saved folder loads back in open_clip and here,
and a spec is identified by content with one-line errors. A tiny architecture is registered here; no download
(open_clip ships its SimpleTokenizer)."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

try:
    import open_clip
except (ImportError, RuntimeError) as e:   # not installed, or its torchvision cannot load beside this torch
    pytest.skip(f"open_clip cannot be imported here: {e}", allow_module_level=True)

from conftest import write_images
from pipeline import openclip
from pipeline.errors import PipelineError
from pipeline.models import DualEncoder, learns_bias, model_identity
from pipeline.tiny_models import save_tiny_open_clip

TEXTS = ["a red circle", "two blue squares left of a star", "a star", "green",
         "a long caption that runs past the tiny tower's context length of twenty four tokens by a good margin"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_open_clip(tmp_path_factory.mktemp("oc") / "tiny-oc.safetensors")


@pytest.fixture
def images(tmp_path):
    return [str(tmp_path / "img" / n) for n in write_images(tmp_path / "img", 4)]


def reference(arch, pretrained, images, texts):
    """open_clip's own encode_image / encode_text on its own transform and tokenizer, normalised."""
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images])
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(open_clip.get_tokenizer(arch)(texts), normalize=True)
    return img.numpy(), txt.numpy()


def test_our_embeddings_are_open_clips(weights, images):
    enc = DualEncoder(f"open_clip:tiny-oc@{weights}")
    assert enc.kind == "open_clip" and enc.max_length == 24
    want_img, want_txt = reference("tiny-oc", str(weights), images, TEXTS)
    np.testing.assert_allclose(enc.encode_images(images, batch_size=3, progress=False), want_img, atol=1e-5)
    np.testing.assert_allclose(enc.encode_texts(TEXTS, batch_size=2, progress=False), want_txt, atol=1e-5)
    assert np.abs(want_img).sum() > 0 and not np.allclose(want_txt[0], want_txt[1])


def test_the_saved_folder_loads_in_open_clip_and_here_with_the_same_embeddings(weights, images, tmp_path):
    enc = DualEncoder(f"open_clip:tiny-oc@{weights}")
    with torch.no_grad():   # weights unlike the file's: the folder must hold the model's own
        enc.model.clip.text_projection.mul_(-1.5)
        enc.model.clip.logit_scale.fill_(1.0)
    ours_img = enc.encode_images(images, progress=False)
    ours_txt = enc.encode_texts(TEXTS, progress=False)
    folder = tmp_path / "final"
    enc.model.save_pretrained(folder)
    enc.image_processor.save_pretrained(folder), enc.tokenizer.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == [openclip.CONFIG, openclip.WEIGHTS]
    for arch, pretrained in (("tiny-oc", str(folder / openclip.WEIGHTS)), (f"local-dir:{folder}", None)):
        img, txt = reference(arch, pretrained, images, TEXTS)
        np.testing.assert_allclose(img, ours_img, atol=1e-5)
        np.testing.assert_allclose(txt, ours_txt, atol=1e-5)
    again = DualEncoder(str(folder))
    np.testing.assert_allclose(again.encode_texts(TEXTS, progress=False), ours_txt, atol=1e-5)
    assert float(again.model.logit_scale.detach()) == 1.0


def test_identity_is_the_content_not_the_path(weights, tmp_path):
    moved = tmp_path / "elsewhere.safetensors"
    shutil.copy(weights, moved)
    first = model_identity(f"open_clip:tiny-oc@{weights}")
    assert first == model_identity(f"open_clip:tiny-oc@{moved}")
    assert first["weights"] and first["model_cfg"]["embed_dim"] == 16 and str(weights) not in str(first)
    other = save_tiny_open_clip(tmp_path / "tiny-oc.safetensors", seed=1)   # same architecture, other weights
    assert model_identity(f"open_clip:tiny-oc@{other}") != first


def test_a_learned_bias_makes_the_siglip_family(weights, tmp_path):
    # (an architecture named *siglip* would take open_clip's SigLIP tokenizer, a download)
    biased = save_tiny_open_clip(tmp_path / "tiny-oc-biased.safetensors", logit_bias=-10.0)
    assert learns_bias(f"open_clip:tiny-oc-biased@{biased}") and not learns_bias(f"open_clip:tiny-oc@{weights}")
    enc = DualEncoder(f"open_clip:tiny-oc-biased@{biased}")
    assert float(enc.model.logit_bias.detach()) == -10.0


@pytest.mark.parametrize("spec, message", [
    ("open_clip:tiny-oc", "is open_clip:ARCH@WEIGHTS_FILE"),
    ("open_clip:no-such-arch@{w}", "open_clip knows no architecture 'no-such-arch'"),
    ("open_clip:tiny-oc@/no/such/file.safetensors", "no such weights file"),
])
def test_bad_specs_are_one_line_errors(weights, spec, message):
    with pytest.raises(PipelineError, match=message) as e:
        DualEncoder(spec.format(w=weights))
    assert "\n" not in str(e.value)


def test_weights_of_another_architecture_are_refused_naming_the_student(weights, tmp_path):
    from pipeline.tiny_models import register_tiny_open_clip

    register_tiny_open_clip(tmp_path, "tiny-oc-wide")
    cfg = tmp_path / "tiny-oc-wide.json"
    cfg.write_text(cfg.read_text().replace('"embed_dim": 16', '"embed_dim": 8'))
    open_clip.add_model_config(cfg)
    with pytest.raises(PipelineError, match="cannot build the open_clip model"):
        DualEncoder(f"open_clip:tiny-oc-wide@{weights}")


def test_the_towers_are_cut_at_open_clips_blocks(weights):
    """distill's --outside-grad-layers: rows encoded with gradient through the last block alone move that block
    and leave the ones below it untouched."""
    from stages.distill import StudentTowers

    enc = DualEncoder(f"open_clip:tiny-oc@{weights}")
    image_blocks, text_blocks = enc.tower_layers()
    assert image_blocks is enc.model.clip.visual.transformer.resblocks and len(image_blocks) == 2
    assert text_blocks is enc.model.clip.transformer.resblocks
    towers = StudentTowers(enc).train()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = enc.tokenize(TEXTS[:3])
    none = torch.zeros(3, dtype=torch.bool)   # every row is an "other": gradient through the last block only
    img, txt, _, _ = towers(pixels, tokens["input_ids"], tokens["attention_mask"], live_images=none,
                            live_texts=none, others=True, others_grad_layers=1)
    (img.sum() + txt.sum()).backward()
    for blocks in (image_blocks, text_blocks):
        assert all(p.grad is None for p in blocks[0].parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks[1].parameters())
