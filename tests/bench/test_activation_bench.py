"""bench/activation_bench.py: the heap it reads grows with the items a step encodes with gradient, and
--grad-checkpointing keeps a fraction of it per item."""
import ctypes

import pytest

from bench.activation_bench import child, heap_in_use

try:
    ctypes.CDLL("libc.so.6").mallinfo2
except (OSError, AttributeError):
    pytest.skip("the heap is read with glibc's mallinfo2", allow_module_level=True)

# big enough that one item's activations (about 0.5 MB for an image here) stand out of the heap's noise
SMALL = dict(vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                         image_size=64, patch_size=8),
             text=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                       max_position_embeddings=32),
             projection_dim=32, text_length=32)


def test_the_heap_in_use_counts_a_tensor_while_it_lives():
    import torch

    before = heap_in_use()
    t = torch.ones(64, 2**20 // 4)               # 64 MB
    held = heap_in_use() - before
    del t
    assert 60 * 2**20 < held < 70 * 2**20
    assert heap_in_use() - before < 8 * 2**20


@pytest.mark.parametrize("kind, few, many", [("image", 8, 40), ("caption", 8, 40)])
def test_a_checkpointed_step_keeps_a_fraction_of_each_items_activations(kind, few, many):
    slope = {}
    for checkpointed in (False, True):
        a, b = (child(kind, n, checkpointed, geometry=SMALL)["peak_mb"] for n in (few, many))
        slope[checkpointed] = (b - a) / (many - few)
    # an item's saved activations: per block about a dozen [tokens, width] tensors (and 4x wider ones), against
    # the block's input alone (and one block's worth, recomputed, at a time) when checkpointed
    assert slope[False] > 0.2 if kind == "image" else slope[False] > 0.1, slope
    assert slope[True] < 0.5 * slope[False], slope
