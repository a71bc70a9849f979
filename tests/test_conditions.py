import numpy as np
import pytest
import torch

from histosynth.conditions.nuclei_mask import drop_condition, nuclei_condition, null_condition_like

# Two touching 3x3 nuclei (ids 1 and 2, types 1 and 3) and nucleus 3 (type 2) cut by the image corner.
INST = np.array(
    [
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 2, 2, 2, 0],
        [0, 1, 1, 1, 2, 2, 2, 0],
        [0, 1, 1, 1, 2, 2, 2, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 3, 3, 3],
        [0, 0, 0, 0, 0, 3, 3, 3],
    ]
)
TYPE = np.array(
    [
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 3, 3, 3, 0],
        [0, 1, 1, 1, 3, 3, 3, 0],
        [0, 1, 1, 1, 3, 3, 3, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 2, 2, 2],
        [0, 0, 0, 0, 0, 2, 2, 2],
    ]
)
# Nucleus pixels with a 4-neighbour of another id (other nucleus or background). The shared border of
# nuclei 1 and 2 (columns 3 and 4) is edge on both sides; only (2,2) and (2,5) are interior. Nucleus 3's
# pixels on the image border (6,6), (6,7) are not edges; (5,7) is (background above).
EDGE = np.array(
    [
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 1, 0],
        [0, 1, 0, 1, 1, 0, 1, 0],
        [0, 1, 1, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 1],
        [0, 0, 0, 0, 0, 1, 0, 0],
    ]
)


def test_condition_matches_hand_built():
    cond = nuclei_condition(INST, TYPE, num_classes=3)
    assert cond.dtype == np.float32 and cond.shape == (4, 7, 8)
    expected = np.stack([TYPE == 1, TYPE == 2, TYPE == 3, EDGE == 1]).astype(np.float32)
    np.testing.assert_array_equal(cond, expected)
    # spot checks written out independently of TYPE
    assert cond[0, 2, 2] == 1 and cond[2, 2, 5] == 1 and cond[1, 6, 7] == 1
    assert cond[:, 0, 0].sum() == 0


def test_unused_classes_are_empty_channels():
    cond = nuclei_condition(INST, TYPE, num_classes=5)
    assert cond.shape == (6, 7, 8)
    assert cond[3].sum() == 0 and cond[4].sum() == 0
    np.testing.assert_array_equal(cond[5], EDGE)


@pytest.mark.parametrize("bad", [4, -1])
def test_type_out_of_range_raises(bad):
    types = TYPE.copy()
    types[2, 2] = bad
    with pytest.raises(ValueError):
        nuclei_condition(INST, types, num_classes=3)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        nuclei_condition(INST, TYPE[:-1], num_classes=3)


def test_null_condition():
    cond = torch.rand(2, 4, 8, 8)
    null = null_condition_like(cond)
    assert null.shape == cond.shape and null.dtype == cond.dtype
    assert torch.count_nonzero(null) == 0


def test_drop_condition_rate_and_zeros():
    cond = torch.rand(4000, 2, 4, 4) + 0.1  # strictly positive: a kept sample is never all-zero
    g = torch.Generator().manual_seed(0)
    new, dropped = drop_condition(cond, 0.2, generator=g)
    assert dropped.dtype == torch.bool and dropped.shape == (4000,)
    assert abs(dropped.float().mean().item() - 0.2) < 0.03
    assert torch.count_nonzero(new[dropped]) == 0
    assert torch.equal(new[~dropped], cond[~dropped])
    assert torch.all(cond > 0)  # input untouched


def test_drop_condition_extremes_and_determinism():
    cond = torch.ones(16, 3, 2, 2)
    assert not drop_condition(cond, 0.0)[1].any()
    assert drop_condition(cond, 1.0)[1].all()
    a = drop_condition(cond, 0.5, torch.Generator().manual_seed(3))[1]
    b = drop_condition(cond, 0.5, torch.Generator().manual_seed(3))[1]
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        drop_condition(cond, 1.5)
