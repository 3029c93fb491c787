import pytest
import torch

from incdet.train.distill import box_distillation, cls_distillation, select_anchors


@pytest.mark.parametrize("form", ["sigmoid_kd", "l2"])
def test_cls_distillation_zero_iff_equal(form):
    torch.manual_seed(0)
    t = torch.randn(2, 10, 3)
    mask = torch.ones(2, 10, dtype=torch.bool)
    assert cls_distillation(t.clone(), t, mask, form).abs() < 1e-6
    s = t + 0.5 * torch.randn_like(t)
    assert cls_distillation(s, t, mask, form) > 1e-3


def test_box_distillation_zero_iff_equal_and_respects_mask():
    t = torch.randn(1, 5, 4)
    mask = torch.tensor([[True, False, False, False, False]])
    assert box_distillation(t.clone(), t, mask) == 0
    s = t.clone()
    s[0, 1:] += 3.0  # differences on unselected anchors only
    assert box_distillation(s, t, mask) == 0
    s[0, 0] += 1.0
    assert box_distillation(s, t, mask) == pytest.approx(4.0)  # four deltas, one anchor


def test_gradient_reaches_student_only():
    torch.manual_seed(0)
    s = torch.randn(1, 4, 2, requires_grad=True)
    t = torch.randn(1, 4, 2, requires_grad=True)
    mask = torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        t_out = t * 1.0  # the teacher runs under no_grad
    (cls_distillation(s, t_out, mask) + box_distillation(s.repeat(1, 1, 2), t_out.repeat(1, 1, 2),
                                                         mask)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_anchor_selection_rules_on_a_hand_made_example():
    # one image, 50 anchors, 2 old classes. Max scores: anchor 3 0.98, anchor 5 0.5,
    # anchor 7 0.12, the rest 0.0025: mean + 2 std of this image is about 0.34
    logits = torch.full((1, 50, 2), -6.0)
    logits[0, 3, 1] = 4.0
    logits[0, 5, 0] = 0.0
    logits[0, 7, 0] = -2.0
    scores = logits.sigmoid().amax(2)[0]
    thr = scores.mean() + 2 * scores.std()
    assert 0.12 < thr < 0.5
    assert select_anchors(logits, "erd")[0].nonzero().flatten().tolist() == [3, 5]
    assert select_anchors(logits, "topk", topk=3)[0].nonzero().flatten().tolist() == [3, 5, 7]
    assert select_anchors(logits, "all").all()


@pytest.mark.parametrize("form", ["sigmoid_kd", "l2"])
def test_distillation_on_the_masks_indices_equals_the_masks(form):
    g = torch.Generator().manual_seed(3)
    t = torch.randn(3, 20, 4, generator=g)
    mask = torch.rand(3, 20, generator=g) > 0.6
    values, grads = [], []
    for where in (mask, mask.nonzero(as_tuple=True)):
        s = (t + torch.randn(3, 20, 4, generator=torch.Generator().manual_seed(4))).requires_grad_()
        v = cls_distillation(s, t, where, form) + box_distillation(s, t, where, "smooth_l1")
        v.backward()
        values.append(v)
        grads.append(s.grad)
    assert values[0] > 0
    assert torch.equal(values[0], values[1]) and torch.equal(grads[0], grads[1])
    empty = torch.zeros(3, 20, dtype=torch.bool)
    assert cls_distillation(t, t, empty.nonzero(as_tuple=True), form) == 0


@pytest.mark.parametrize("who", ["labels", "teacher"])
def test_labelled_anchors_decide_who_trains_the_old_classes_on_objects(
        tiny_config, monkeypatch, who):
    """incremental.labelled_anchors: with ``labels`` no anchor matched to an annotated box is
    distilled (its label trains every class there); with ``teacher`` they are (anchors: all)."""
    from incdet.base.config import load_config
    from incdet.experiment import methods
    from incdet.experiment.loaders import new_class_batch
    from incdet.train import distill
    from incdet.train.losses import match_anchors

    cfg = load_config(tiny_config, ["model.fpn_channels=8", "incremental.anchors=all",
                                    f"incremental.labelled_anchors={who}"])
    classes, sc, plan, images, targets = new_class_batch(cfg, 2)
    previous = {"model": methods.build_model(cfg["model"], [len(sc.old)]).state_dict(),
                "head_layout": [len(sc.old)]}
    student = methods.build_student(cfg, sc, plan, previous)
    criterion = methods.make_criterion(cfg, student, methods.build_teacher(cfg, previous), plan,
                                       classes, sc)
    assert criterion.detection.objects_negative_for_all is (who == "labels")
    distilled = []
    real = distill.cls_distillation
    monkeypatch.setattr(distill, "cls_distillation",
                        lambda s, t, where, *a: distilled.append(where) or real(s, t, where, *a))
    losses = criterion(list(images), list(targets))
    assert torch.isfinite(sum(losses.values()))
    _, anchors, targets_t, _ = methods.forward_train(student, list(images), list(targets))
    matched = match_anchors(student.proposal_matcher, anchors, targets_t)
    on_objects = matched[distilled[0]] >= 0
    assert int((matched >= 0).sum()) > 0
    if who == "labels":
        assert not on_objects.any() and len(distilled[0][0]) == int((matched < 0).sum())
    else:
        assert len(distilled[0][0]) == matched.numel()  # every anchor, objects included
