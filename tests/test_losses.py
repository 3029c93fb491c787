import torch

from incdet.losses import masked_focal_loss


def _setup():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 4, requires_grad=True)  # (N, HWA, K)
    targets = [{"boxes": torch.zeros(1, 4), "labels": torch.tensor([2]),
                "label_space": torch.tensor([2, 3])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "label_space": torch.tensor([0, 1, 2, 3])}]
    matched = [torch.tensor([0, -1, -1, -2, -1, 0]), torch.full((6,), -1)]
    return logits, targets, matched


def test_no_background_gradient_outside_label_space():
    logits, targets, matched = _setup()
    masked_focal_loss(logits, targets, matched).backward()
    g = logits.grad
    # image 0 is annotated for classes 2, 3 only: channels 0, 1 get no gradient anywhere
    assert torch.all(g[0, :, :2] == 0)
    assert torch.all(g[0, :, 2:][[0, 1, 2, 4, 5]] != 0)
    # anchor 3 is between thresholds: ignored
    assert torch.all(g[0, 3] == 0)
    # image 1 is annotated for everything: all channels learn background
    assert torch.all(g[1] != 0)


def test_unmasked_equals_plain_focal_loss():
    from torchvision.ops import sigmoid_focal_loss

    logits, targets, matched = _setup()
    for t in targets:
        t["label_space"] = torch.arange(4)
    loss = masked_focal_loss(logits, targets, matched)
    gt = torch.zeros(2, 6, 4)
    gt[0, [0, 5], 2] = 1
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[0, 3] = False
    expected = sigmoid_focal_loss(logits[valid], gt[valid], reduction="sum") / 2
    assert torch.allclose(loss, expected)
