"""Model loading fails fast: a missing folder, or a hub name with the hub unreachable and nothing cached."""
import time

import pytest

from pipeline.errors import PipelineError
from pipeline.models import check_reachable


def test_a_missing_folder_is_named_at_once(tmp_path):
    for name in (str(tmp_path / "nope"), "./student", "runs/nowhere/models/student"):
        with pytest.raises(PipelineError, match="no such model folder"):
            check_reachable(name)
    check_reachable(str(tmp_path))                                  # an existing folder passes


def test_a_hub_name_without_the_hub_fails_fast_and_says_what_to_do(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))               # an empty cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")     # nothing listens there
    start = time.time()
    with pytest.raises(PipelineError, match=r"^some-org/some-model-not-cached: not in the local cache and the Hugging "
                                            r"Face hub \(http://127.0.0.1:9\) cannot be reached; download it first "
                                            r"with `hf download some-org/some-model-not-cached` \(or pass a local "
                                            r"folder\)$"):
        check_reachable("some-org/some-model-not-cached")
    assert time.time() - start < 10


def test_a_hub_name_not_in_the_cache_with_the_hub_off_says_to_download_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError, match=r"^some-org/some-model: not in the local cache; download it first with "
                                            r"`hf download some-org/some-model` \(or pass a local folder\)$"):
        check_reachable("some-org/some-model")
    # a cached copy passes: the hub's cache layout, models--ORG--NAME/snapshots/REV/config.json
    cache = tmp_path / "hf" / "hub" / "models--some-org--some-model"
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text("abc")
    (cache / "snapshots" / "abc").mkdir(parents=True)
    (cache / "snapshots" / "abc" / "config.json").write_text("{}")
    check_reachable("some-org/some-model")


def test_a_typo_of_a_local_folder_is_not_taken_for_a_hub_name(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny-clip").mkdir(parents=True)
    check_reachable("models/tiny-clip")
    with pytest.raises(PipelineError, match=r"^models/tiny-clipp: no such model folder$"):
        check_reachable("models/tiny-clipp")
    with pytest.raises(PipelineError, match=r"^not a--name: no such model folder$"):   # no hub name either
        check_reachable("not a--name")


def test_a_siglip_caption_embeds_the_same_alone_and_beside_a_longer_one(tiny_siglip, tiny_clip):
    """SigLIP pools its text tower's last position: its captions are padded to the tower's length, never to the
    batch's longest (a CLIP, pooled at its end token, keeps padding to the batch)."""
    import numpy as np

    from pipeline.models import DualEncoder, learns_bias

    enc = DualEncoder(str(tiny_siglip))
    alone = enc.encode_texts(["a red circle"], progress=False)
    batched = enc.encode_texts(["a red circle", "a much longer caption with many more words than the first"],
                               progress=False)
    np.testing.assert_allclose(alone[0], batched[0], atol=1e-5)
    assert enc.tokenize(["a red circle"])["input_ids"].shape == (1, enc.max_length)
    assert DualEncoder(str(tiny_clip)).tokenize(["a red circle"])["input_ids"].shape[1] < enc.max_length
    assert learns_bias(str(tiny_siglip)) and not learns_bias(str(tiny_clip))
