import torch

from pipeline.demo.models import demo_token_ids, pack, unpack


def test_pack_unpack_round_trip_on_demo_tokens(tmp_path, tiny_clip):
    from transformers import AutoTokenizer, CLIPModel

    tokens = demo_token_ids(["a red circle left of a blue square", "a green triangle under a yellow star"])
    assert 10 < len(tokens) < 30
    pack(tiny_clip, tmp_path / "s.safetensors", "student", tokens, {"itc_weight": 2.0})
    meta = unpack(tmp_path / "s.safetensors", tmp_path / "out")
    assert meta == {"itc_weight": 2.0}
    a, b = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPModel.from_pretrained(tmp_path / "out").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    t = tok(["a red circle left of a blue square"], return_tensors="pt")
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        fa = a.get_text_features(**t).pooler_output
        fb = b.get_text_features(**t).pooler_output
        ia = a.get_image_features(pixel_values=px).pooler_output
        ib = b.get_image_features(pixel_values=px).pooler_output
    torch.testing.assert_close(fa, fb, atol=2e-2, rtol=2e-2)  # fp16 storage
    torch.testing.assert_close(ia, ib, atol=2e-2, rtol=2e-2)
    emb = b.text_model.embeddings.token_embedding.weight
    unused = [i for i in range(emb.shape[0]) if i not in set(tokens)][:100]
    assert torch.count_nonzero(emb[unused]) == 0  # only the demo vocabulary is stored
