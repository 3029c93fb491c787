import pytest
import torch

from incdet.model.heads import IncrementalClassificationHead


@pytest.mark.parametrize("num_anchors", [1, 3, 9])
def test_growth_keeps_old_logits_bit_identical(num_anchors):
    torch.manual_seed(0)
    head = IncrementalClassificationHead(16, num_anchors, [5], num_convs=2).eval()
    feats = [torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4)]
    with torch.no_grad():
        before = head(feats)  # (N, HWA, 5)
        head.grow(3)
        after = head(feats)  # (N, HWA, 8)
        head.grow(2)
        twice = head(feats)
    assert before.shape == (2, (64 + 16) * num_anchors, 5)
    assert after.shape == (2, before.shape[1], 8) and twice.shape == (2, before.shape[1], 10)
    assert torch.equal(after[..., :5], before)
    assert torch.equal(twice[..., :8], after)
    assert head.classes_per_step == [5, 3, 2] and head.num_classes == 10


def test_layout_is_anchor_major_and_new_biases_at_prior():
    torch.manual_seed(0)
    head = IncrementalClassificationHead(8, 2, [3, 2], num_convs=1, prior_probability=0.01)
    prior = -torch.log(torch.tensor((1 - 0.01) / 0.01))
    assert torch.allclose(head.classifiers[1].bias, prior.expand(4))
    feats = torch.randn(1, 8, 3, 3)
    with torch.no_grad():
        out = head([feats])  # (1, 9 * 2, 5)
        t = head.conv(feats)
        old = head.classifiers[0](t)  # (1, A*3, H, W), channel a*3 + k
        new = head.classifiers[1](t)
    # location (y=1, x=2), anchor 1: index (y * W + x) * A + a
    idx = (1 * 3 + 2) * 2 + 1
    assert torch.equal(out[0, idx, :3], old[0, 1 * 3:1 * 3 + 3, 1, 2])
    assert torch.equal(out[0, idx, 3:], new[0, 1 * 2:1 * 2 + 2, 1, 2])


def test_matches_a_torchvision_head_layout():
    """One classifier is exactly torchvision's (N, A*K, H, W) -> (N, HWA, K) permutation."""
    torch.manual_seed(0)
    head = IncrementalClassificationHead(8, 3, [4], num_convs=1)
    feats = torch.randn(2, 8, 5, 4)
    with torch.no_grad():
        raw = head.classifiers[0](head.conv(feats))
        n, _, h, w = raw.shape
        expected = raw.view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
        assert torch.equal(head([feats]), expected)
