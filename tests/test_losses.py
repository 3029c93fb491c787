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


def _batch(num_images: int, seed: int):
    """Head outputs, anchors and targets of ``num_images`` random images (3 boxes each)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num_images, 40, 2, generator=g) * 60
    anchors = torch.cat([xy, xy + 8 + torch.rand(num_images, 40, 2, generator=g) * 24], 2)
    outputs = {"cls_logits": torch.randn(num_images, 40, 4, generator=g),
               "bbox_regression": torch.randn(num_images, 40, 4, generator=g) * 0.1}
    targets = [{"boxes": anchors[i, :3] + 1.0, "labels": torch.tensor([0, 1, 3]),
                "label_space": torch.arange(4)} for i in range(num_images)]
    return outputs, list(anchors), targets


def _detection_loss(replay_weight=None):
    from torchvision.models.detection import _utils as det_utils

    from incdet.config import DEFAULTS
    from incdet.losses import DetectionLoss

    return DetectionLoss(DEFAULTS["loss"], det_utils.BoxCoder((1.0, 1.0, 1.0, 1.0)),
                         det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True),
                         replay_weight)


def _concat(a, b, replayed_b=True):
    (oa, aa, ta), (ob, ab, tb) = a, b
    tb = [dict(t, replayed=replayed_b) for t in tb]
    return {k: torch.cat([oa[k], ob[k]]) for k in oa}, aa + ab, ta + tb


def test_separate_replay_loss_leaves_the_new_images_loss_unchanged():
    new, memory = _batch(3, seed=1), _batch(2, seed=2)
    alone = _detection_loss()(*new)
    mixed = _concat(new, memory)
    # pooled: the memory images' foreground anchors dilute the new images' loss
    pooled = _detection_loss()(*mixed)
    separate_w0 = _detection_loss(replay_weight=0.0)(*mixed)
    for key in ("loss_cls", "loss_box"):
        assert torch.allclose(separate_w0[key], alone[key])
        assert not torch.allclose(pooled[key], alone[key])
    memory_alone = _detection_loss()(*memory)
    separate = _detection_loss(replay_weight=0.25)(*mixed)
    for key in ("loss_cls", "loss_box"):
        assert torch.allclose(separate[key], alone[key] + 0.25 * memory_alone[key])
    # a batch without replayed images: separate is the pooled loss
    unflagged = _concat(new, memory, replayed_b=False)
    for key in ("loss_cls", "loss_box"):
        assert torch.allclose(_detection_loss(0.25)(*unflagged)[key],
                              _detection_loss()(*unflagged)[key])


def test_replay_weight_is_the_memory_share_of_the_batch():
    import copy

    import pytest

    from incdet.config import DEFAULTS
    from incdet.errors import UserError
    from incdet.methods import replay_weight

    cfg = copy.deepcopy(DEFAULTS)
    cfg["train"]["batch_size"] = 16
    cfg["memory"].update(replay_loss="pooled")
    assert replay_weight(cfg) is None
    cfg["memory"].update(replay_loss="separate", replay_mode="add", replay_fraction=0.125)
    assert replay_weight(cfg) == 2 / 16
    cfg["memory"].update(replay_mode="share", replay_fraction=0.25)
    assert replay_weight(cfg) == 4 / 12
    cfg["memory"].update(replay_loss="mean")
    with pytest.raises(UserError, match="memory.replay_loss: 'mean' is not one of pooled, "
                                        "separate"):
        replay_weight(cfg)
