import pytest
import torch

from incdet.train.losses import masked_focal_loss


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


def test_objects_are_negatives_of_every_other_class_when_the_labels_decide():
    """incremental.labelled_anchors: labels. On an anchor matched to a box, the classes outside
    the image's label space learn background too; elsewhere they still get no gradient."""
    from torchvision.ops import sigmoid_focal_loss

    logits, targets, matched = _setup()
    masked_focal_loss(logits, targets, matched, objects_negative_for_all=True).backward()
    g = logits.grad
    assert torch.all(g[0, [0, 5], :2] != 0)  # anchors 0 and 5 are on the class-2 box
    assert torch.all(g[0, [1, 2, 3, 4], :2] == 0)  # background and ignored anchors: as before
    # the value: the masked loss plus the focal background terms of classes 0, 1 on anchors 0, 5
    base = masked_focal_loss(logits, targets, matched)
    extra = sigmoid_focal_loss(logits[0, [0, 5], :2], torch.zeros(2, 2), reduction="sum")
    got = masked_focal_loss(logits, targets, matched, objects_negative_for_all=True)
    torch.testing.assert_close(got, base + extra / 2)  # 2 foreground anchors in the batch


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

    from incdet.base.config import DEFAULTS
    from incdet.train.losses import DetectionLoss

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

    from incdet.base.config import DEFAULTS
    from incdet.base.errors import UserError
    from incdet.experiment.methods import replay_weight

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


# Per-image references: what the batched functions replace, written image by image on top of
# torchvision's own Matcher and box_iou.
def _match_per_image(matcher, anchors, targets):
    from torchvision.ops import box_iou

    out = []
    for anc, t in zip(anchors, targets):
        if t["boxes"].numel() == 0:
            out.append(torch.full((anc.size(0),), -1, dtype=torch.int64))
        else:
            out.append(matcher(box_iou(t["boxes"], anc)))
    return out


def _losses_per_image(outputs, anchors, targets, matched, box_coder, kind, alpha=0.25, gamma=2.0):
    from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

    logits, regression = outputs["cls_logits"], outputs["bbox_regression"]
    cls_total, box_total, num_fg = logits.sum() * 0.0, regression.sum() * 0.0, 0
    for i, (t, m) in enumerate(zip(targets, matched)):
        fg = m >= 0
        num_fg += int(fg.sum())
        gt = torch.zeros_like(logits[i])
        gt[fg, t["labels"][m[fg]]] = 1.0
        space = torch.zeros(logits.shape[2], dtype=torch.bool)
        if t.get("label_space") is None:
            space[:] = True
        else:
            space[t["label_space"]] = True
        weight = ((m != -2)[:, None] & space[None, :]) | (gt > 0)
        cls_total = cls_total + (sigmoid_focal_loss(logits[i], gt, alpha, gamma, "none")
                                 * weight).sum()
        if fg.any():
            gt_boxes, reg, anc = t["boxes"][m[fg]], regression[i][fg], anchors[i][fg]
            if kind == "giou":
                box_total = box_total + generalized_box_iou_loss(
                    box_coder.decode_single(reg, anc), gt_boxes, reduction="sum")
            elif kind == "l1":
                box_total = box_total + torch.nn.functional.l1_loss(
                    reg, box_coder.encode_single(gt_boxes, anc), reduction="sum")
            else:
                box_total = box_total + torch.nn.functional.smooth_l1_loss(
                    reg, box_coder.encode_single(gt_boxes, anc), reduction="sum", beta=1.0 / 9)
    return {"loss_cls": cls_total / max(1, num_fg), "loss_box": box_total / max(1, num_fg)}


def _awkward_batch(seed: int = 0):
    """Five images of 60 anchors on a 10 x 6 grid (duplicate anchors give ties between
    anchors): random boxes, an image without boxes, a box twice (ties between boxes), a box that
    overlaps no anchor well (a low-quality match only) and one that overlaps none at all."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(6.0) * 10, torch.arange(10.0) * 10, indexing="ij")
    grid = torch.stack([xs, ys, xs + 16, ys + 16], -1).reshape(-1, 4)
    grid[1] = grid[0]  # two identical anchors
    anchors = [grid.clone() for _ in range(5)]

    def rand_boxes(k):
        xy = torch.rand(k, 2, generator=g) * 80
        return torch.cat([xy, xy + 4 + torch.rand(k, 2, generator=g) * 30], 1)

    boxes = [rand_boxes(4), torch.zeros(0, 4), rand_boxes(2),
             torch.tensor([[2.0, 3.0, 6.0, 7.0], [200.0, 200.0, 210.0, 210.0]]),
             rand_boxes(7)]
    boxes[2] = torch.cat([boxes[2], boxes[2][:1], grid[:1]])  # a duplicate box; a copy of anchor 0
    targets = []
    for i, b in enumerate(boxes):
        t = {"boxes": b, "labels": torch.randint(0, 5, (len(b),), generator=g)}
        if i != 4:  # the last image has no label space: annotated for every class
            t["label_space"] = torch.tensor([0, 2, 3]) if i % 2 else torch.arange(5)
        targets.append(t)
    outputs = {"cls_logits": torch.randn(5, 60, 5, generator=g),
               "bbox_regression": torch.randn(5, 60, 4, generator=g) * 0.2}
    return outputs, anchors, targets


@pytest.mark.parametrize("thresholds,low_quality", [
    ((0.5, 0.4), True), ((0.4, 0.3), True), ((0.5, 0.4), False), ((0.3, 0.3), True)])
@pytest.mark.parametrize("budget", [None, 1])
def test_batched_matching_equals_torchvision_matcher_per_image(thresholds, low_quality,
                                                               budget, monkeypatch):
    from torchvision.models.detection import _utils as det_utils

    import incdet.train.losses as losses

    if budget is not None:  # one image at a time: the chunked path
        monkeypatch.setattr(losses, "IOU_BUDGET", budget)
    matcher = det_utils.Matcher(*thresholds, allow_low_quality_matches=low_quality)
    for seed in range(3):
        _, anchors, targets = _awkward_batch(seed)
        got = losses.match_anchors(matcher, anchors, targets)
        expected = torch.stack(_match_per_image(matcher, anchors, targets))
        assert got.shape == (5, 60) and got.dtype == torch.int64
        assert torch.equal(got, expected)
        assert (got[1] == -1).all()  # no boxes: all background
        if low_quality:  # the box that overlaps no anchor still matches (every anchor, IoU 0)
            assert (got[3] >= 0).all()
            assert got[2, 0] == got[2, 1] == 3  # two identical anchors, both best for box 3
        assert not (got[2] == 2).any()  # box 2 is box 0 again: ties go to the first box
    no_boxes = [dict(t, boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64))
                for t in targets]
    assert (losses.match_anchors(matcher, anchors, no_boxes) == -1).all()


def test_pad_targets_places_every_box_and_marks_the_padding():
    from incdet.train.losses import pad_targets

    boxes = [torch.tensor([[1., 2., 3., 4.], [5., 6., 7., 8.]]), torch.zeros(0, 4),
             torch.tensor([[9., 10., 11., 12.]])]
    labels = [torch.tensor([3, 0]), torch.zeros(0, dtype=torch.int64), torch.tensor([7])]
    padded = pad_targets([{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)])
    assert padded.boxes.shape == (3, 2, 4) and padded.labels.shape == (3, 2)
    assert torch.equal(padded.valid, torch.tensor([[True, True], [False, False], [True, False]]))
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        n = len(b)
        assert torch.equal(padded.boxes[i, :n], b) and torch.equal(padded.labels[i, :n], lab)
        assert (padded.boxes[i, n:] == 0).all() and (padded.labels[i, n:] == 0).all()
    empty = pad_targets([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])
    assert empty.boxes.shape == (1, 0, 4) and empty.valid.shape == (1, 0)


def test_label_space_mask_is_one_row_per_image():
    from incdet.train.losses import label_space_mask

    _, _, targets = _awkward_batch()
    mask = label_space_mask(targets, 5, "cpu")
    expected = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [1, 1, 1, 1, 1], [1, 0, 1, 1, 0],
                             [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("kind", ["giou", "l1", "smooth_l1"])
@pytest.mark.parametrize("replay_weight", [None, 0.5])
def test_batched_losses_equal_the_per_image_ones(kind, replay_weight):
    from torchvision.models.detection import _utils as det_utils

    from incdet.base.config import DEFAULTS
    from incdet.train.losses import DetectionLoss

    matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
    box_coder = det_utils.BoxCoder((1.0, 1.0, 1.0, 1.0))
    for seed in range(3):
        outputs, anchors, targets = _awkward_batch(seed)
        if replay_weight is not None:
            for i in (1, 3):
                targets[i]["replayed"] = True
        batched_out = {k: v.clone().requires_grad_() for k, v in outputs.items()}
        ref_out = {k: v.clone().requires_grad_() for k, v in outputs.items()}
        got = DetectionLoss(dict(DEFAULTS["loss"], box=kind), box_coder, matcher,
                            replay_weight)(batched_out, anchors, targets)
        matched = _match_per_image(matcher, anchors, targets)
        if replay_weight is None:
            expected = _losses_per_image(ref_out, anchors, targets, matched, box_coder, kind)
        else:
            parts = []
            for idx in ([0, 2, 4], [1, 3]):
                sub = {k: v[idx] for k, v in ref_out.items()}
                parts.append(_losses_per_image(sub, [anchors[i] for i in idx],
                                               [targets[i] for i in idx],
                                               [matched[i] for i in idx], box_coder, kind))
            expected = {k: parts[0][k] + replay_weight * parts[1][k] for k in parts[0]}
        assert set(got) == {"loss_cls", "loss_box"}
        for k in got:
            assert got[k].item() > 0
            torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-6)
        sum(got.values()).backward()
        sum(expected.values()).backward()
        for k in outputs:
            torch.testing.assert_close(batched_out[k].grad, ref_out[k].grad, rtol=1e-6,
                                       atol=1e-6)


@pytest.mark.parametrize("gamma", [2.0, 1.5, 0.0])
def test_focal_sum_gradient_is_the_derivative_of_its_value(gamma):
    from incdet.train.losses import _FocalSum

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 7, 4, generator=g, dtype=torch.float64) * 4).requires_grad_()
    positive = torch.rand(3, 7, 4, generator=g) > 0.7
    negative = torch.rand(3, 7, 4, generator=g) > 0.3
    for alpha in (0.25, -1.0):
        assert torch.autograd.gradcheck(
            lambda v, a=alpha: _FocalSum.apply(v, positive, negative, a, gamma), (x,))


@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_masked_focal_loss_is_torchvisions_focal_loss_times_the_mask(alpha):
    from torchvision.ops import sigmoid_focal_loss

    logits, targets, matched = _setup()
    logits = (logits.detach() * 30).requires_grad_()  # saturated logits too: |x| up to ~70
    loss = masked_focal_loss(logits, targets, matched, alpha=alpha, gamma=1.5)
    gt = torch.zeros(2, 6, 4)
    gt[0, [0, 5], 2] = 1
    weight = torch.ones(2, 6, 4, dtype=torch.bool)
    weight[0, :, :2] = False  # image 0: annotated for classes 2, 3
    weight[0, 3] = False  # between thresholds
    ref_logits = logits.detach().clone().requires_grad_()
    expected = (sigmoid_focal_loss(ref_logits, gt, alpha, 1.5, "none") * weight).sum() / 2
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-7)


def test_softplus_is_torchs_softplus_over_the_whole_range():
    from incdet.train.losses import _softplus

    z = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([-1e4, 1e4, 0.0])])
    # relative accuracy also where the value is tiny (a plain log(1 + e) gives 0 below -16.6)
    torch.testing.assert_close(_softplus(z), torch.nn.functional.softplus(z), rtol=2e-6,
                               atol=1e-44)


def test_focal_loss_of_bfloat16_logits_is_computed_in_float32():
    logits, targets, matched = _setup()
    low = logits.detach().to(torch.bfloat16).requires_grad_()
    loss = masked_focal_loss(low, targets, matched)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, masked_focal_loss(low.detach().float(), targets, matched))
    loss.backward()
    assert low.grad.dtype == torch.bfloat16


def test_box_decoding_and_encoding_are_torchvisions_to_the_bit():
    from torchvision.models.detection import _utils as det_utils

    from incdet.train.losses import decode_boxes, encode_boxes

    g = torch.Generator().manual_seed(5)
    xy = torch.rand(50, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=g) * 40], 1)
    codes = torch.randn(50, 4, generator=g) * 2
    codes[0, 2:] = 30.0  # beyond bbox_xform_clip
    for weights in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
        coder = det_utils.BoxCoder(weights)
        assert torch.equal(decode_boxes(coder, codes, anchors), coder.decode_single(codes, anchors))
        gt = decode_boxes(coder, codes * 0.1, anchors)
        assert torch.equal(encode_boxes(coder, gt, anchors), coder.encode_single(gt, anchors))
