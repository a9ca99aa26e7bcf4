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


def test_a_hub_name_without_the_hub_fails_fast_and_says_what_to_do(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")     # nothing listens there
    start = time.time()
    with pytest.raises(PipelineError, match="cannot be reached; pass a local folder .* HF_HUB_OFFLINE=1"):
        check_reachable("some-org/some-model-not-cached")
    assert time.time() - start < 10
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")                         # then the loader uses the cache
    check_reachable("some-org/some-model-not-cached")
