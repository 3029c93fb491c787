import copy

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from incdet.base.config import DEFAULTS
from incdet.base.errors import UserError
from incdet.model.builder import build_model, forward_train

SMALL = dict(DEFAULTS["model"], fpn_channels=16, head_convs=1, min_size=64, max_size=64)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large", "mobilenet_v3_small"])
def test_from_scratch_trains_everything_with_real_norm_layers(backbone):
    model = build_model(dict(SMALL, backbone=backbone), [3, 2])
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert model.head.classification_head.num_classes == 5
    model.train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 4, 30, 40]]), "labels": torch.tensor([4])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    head_outputs, anchors, _, _ = forward_train(model, images, targets)
    n_anchors = anchors[0].shape[0]
    # P3-P7 at strides 8 to 128 of the 64-px image: 8x8, 4x4, 2x2, 1x1, 1x1 cells
    assert n_anchors == (64 + 16 + 4 + 1 + 1) * model.anchor_generator.num_anchors_per_location()[0]
    assert head_outputs["cls_logits"].shape == (2, n_anchors, 5)
    assert head_outputs["bbox_regression"].shape == (2, n_anchors, 4)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}


def test_frozen_norm_without_weights_is_refused():
    with pytest.raises(UserError, match="needs pretrained model.weights"):
        build_model(dict(SMALL, norm="frozen"), [2])


def test_weights_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(UserError, match="does not exist"):
        build_model(dict(SMALL, weights=str(tmp_path / "missing.pth")), [2])
    with pytest.raises(UserError, match="neither a file nor a torchvision weights name"):
        build_model(dict(SMALL, weights="NoSuchWeights.V1"), [2])
    with pytest.raises(UserError, match="not in the local torch cache") as err:
        build_model(dict(SMALL, backbone="resnet18", weights="ResNet18_Weights.IMAGENET1K_V1"),
                    [2])
    assert "make weights" not in str(err.value)  # fetch_weights cannot get this one
    # the file fetch_weights can get: the message says how
    with pytest.raises(UserError, match=r"not in the local torch cache.*run `make weights`"):
        build_model(dict(SMALL, backbone="mobilenet_v2", reduced_tail=False,
                         weights="MobileNet_V2_Weights.IMAGENET1K_V1"), [2])


def test_weights_from_a_file_are_loaded_and_norm_frozen(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(dict(SMALL, backbone="resnet18", weights=str(path), trainable_layers=3),
                        [2])
    body = model.backbone.body
    assert torch.equal(body.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert not body.conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad


def test_anchor_sizes_must_match_levels():
    with pytest.raises(UserError, match="one size per level"):
        build_model(dict(copy.deepcopy(SMALL), anchor_sizes=[16, 32]), [2])


def test_mobilenet_shape_options_shrink_the_backbone_and_refuse_pretrained_weights(tmp_path):
    full = build_model(dict(SMALL, reduced_tail=False), [2])
    small = build_model(dict(SMALL, width_mult=0.5, reduced_tail=True), [2])
    body_full, body_small = full.backbone.body, small.backbone.body
    # the last stage's output channels: 960 at full width; halved tail and half width -> 240
    assert list(body_full.values())[-1].out_channels == 960
    assert list(body_small.values())[-1].out_channels == 240

    def size(m):
        return sum(p.numel() for p in m.parameters())

    assert size(small) < 0.5 * size(full)
    small.eval()
    with torch.no_grad():
        assert set(small([torch.rand(3, 64, 64)])[0]) == {"boxes", "scores", "labels"}
    weights = tmp_path / "mnv3.pth"
    torch.save(torchvision.models.mobilenet_v3_large().state_dict(), weights)
    with pytest.raises(UserError, match="model.width_mult / model.reduced_tail"):
        build_model(dict(SMALL, weights=str(weights), reduced_tail=True), [2])
    model = build_model(dict(SMALL, weights=str(weights), reduced_tail=False), [2])
    assert list(model.backbone.body.values())[-1].out_channels == 960


def test_fpn_norm_option_puts_norm_layers_after_every_fpn_conv():
    plain = build_model(dict(SMALL), [2])
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in plain.backbone.fpn.modules())
    model = build_model(dict(SMALL, fpn_norm="groupnorm"), [2])
    fpn_convs = [m for m in model.backbone.fpn.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.backbone.fpn.modules() if isinstance(m, torch.nn.GroupNorm)]
    # inner (1x1) and layer (3x3) blocks of 3 levels are normalised; P6/P7 convs are not
    assert len(norms) == 6 and len(fpn_convs) == 8
    with pytest.raises(UserError, match="model.fpn_norm: 'layernorm'"):
        build_model(dict(SMALL, fpn_norm="layernorm"), [2])


def test_groupnorm_backbone_builds_for_every_channel_count():
    # mobilenet has stages of 16, 24, 40, 72, ... channels: each gets a GroupNorm that divides it
    model = build_model(dict(SMALL, norm="groupnorm"), [2])
    norms = [m for m in model.backbone.body.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_channels % m.num_groups == 0 and m.num_channels // m.num_groups >= 4
                         for m in norms)
    model.train()
    head_outputs, _, _, _ = forward_train(model, [torch.rand(3, 64, 64)],
                                          [{"boxes": torch.tensor([[4.0, 4, 30, 40]]),
                                            "labels": torch.tensor([1])}])
    assert torch.isfinite(head_outputs["cls_logits"]).all()


@pytest.mark.parametrize("shape,min_size,max_size,training", [
    ((3, 128, 128), 128, 128, True),   # the built-in data: scale 1, no padding
    ((3, 90, 130), 128, 200, True),    # upscaled (x 1.42) and padded to a multiple of 32
    ((3, 160, 240), 128, 190, False),  # downscaled by the longer side, evaluation mode
])
def test_batch_transform_equals_torchvision_per_image(shape, min_size, max_size, training):
    """The batched normalise-resize-pad gives torchvision's per-image result to the bit, draws
    the same random numbers, and leaves the input targets alone."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from incdet.model.builder import batch_transform

    transform = GeneralizedRCNNTransform(min_size, max_size, [0.485, 0.456, 0.406],
                                         [0.229, 0.224, 0.225]).train(training)
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(shape, generator=gen) for _ in range(5)]
    targets = [{"boxes": torch.rand(3, 4, generator=gen) * 60 + torch.tensor([0, 0, 30, 30]),
                "labels": torch.arange(3)} for _ in range(5)]
    before = [t["boxes"].clone() for t in targets]
    torch.manual_seed(1)
    want_list, want = transform(images, targets)
    state = torch.get_rng_state()
    torch.manual_seed(1)
    got_list, got = batch_transform(transform, images, targets)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(got_list.tensors, want_list.tensors)
    assert got_list.image_sizes == want_list.image_sizes
    for g, w, b, t in zip(got, want, before, targets):
        assert torch.equal(g["boxes"], w["boxes"]) and torch.equal(g["labels"], w["labels"])
        assert torch.equal(t["boxes"], b)  # the caller's targets are not modified
    assert batch_transform(transform, images)[1] is None


def test_batch_transform_falls_back_where_it_cannot_batch(monkeypatch):
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from incdet.model import builder

    calls = []
    transform = GeneralizedRCNNTransform((96, 128), 128, [0.5] * 3, [0.2] * 3)
    original = GeneralizedRCNNTransform.forward
    monkeypatch.setattr(GeneralizedRCNNTransform, "forward",
                        lambda self, *a: calls.append(1) or original(self, *a))
    mixed = [torch.rand(3, 128, 128), torch.rand(3, 96, 128)]
    torch.manual_seed(0)
    want = transform(mixed)[0].tensors
    torch.manual_seed(0)
    assert torch.equal(builder.batch_transform(transform, mixed)[0].tensors, want)
    assert len(calls) == 2  # the reference and the fallback: different shapes
    same = [torch.rand(3, 128, 128)] * 2
    builder.batch_transform(transform.train(), same)  # two training sizes: per image
    assert len(calls) == 3
    builder.batch_transform(transform.eval(), same)  # evaluation uses the last size: batched
    assert len(calls) == 3


def test_batch_anchors_equal_the_generator_and_are_computed_once_per_shape():
    from torchvision.models.detection.image_list import ImageList

    from incdet.model import builder

    model = build_model(copy.deepcopy(DEFAULTS["model"]), [3])
    gen = model.anchor_generator
    calls = []
    gen.register_forward_hook(lambda *_: calls.append(1))
    features = [torch.rand(4, 8, s, s) for s in (16, 8, 4, 2, 1)]
    batch = ImageList(torch.rand(4, 3, 128, 128), [(128, 128), (120, 128), (128, 100), (64, 64)])
    want = gen(batch, features)
    calls.clear()
    got = builder.batch_anchors(gen, batch, features)
    again = builder.batch_anchors(gen, batch, features)
    assert len(got) == len(again) == 4 and calls == [1]  # the second batch: from the cache
    for g, a, w in zip(got, again, want):
        assert torch.equal(g, w) and a is g
    # another padded size is another entry; the cache keeps at most ANCHOR_CACHE_SIZE of them
    small = ImageList(torch.rand(2, 3, 64, 64), [(64, 64)] * 2)
    small_features = [f[:2, :, :max(1, f.shape[-1] // 2), :max(1, f.shape[-1] // 2)]
                      for f in features]
    assert torch.equal(builder.batch_anchors(gen, small, small_features)[1],
                       gen(small, small_features)[1])
    for size in range(builder.ANCHOR_CACHE_SIZE + 3):
        builder.batch_anchors(gen, ImageList(torch.rand(1, 3, 32, 32 + size), [(32, 32)]),
                              features)
    assert len(builder._ANCHOR_CACHE[gen]) == builder.ANCHOR_CACHE_SIZE


def test_mobilenet_v2_has_torchvisions_body_and_loads_a_classification_state_dict(tmp_path):
    torch.manual_seed(2)
    reference = torchvision.models.mobilenet_v2(weights=None).eval()
    path = tmp_path / "mnv2.pth"
    torch.save(reference.state_dict(), path)  # features.* and the ImageNet classifier.*
    model = build_model(dict(SMALL, backbone="mobilenet_v2", reduced_tail=False,
                             weights=str(path)), [2]).eval()
    body = model.backbone.body
    # model.norm auto: a MobileNet with weights trains its BatchNorm (a ResNet's stays frozen)
    norms = [m for m in body.modules() if type(m).__name__.endswith("Norm2d")]
    assert {type(m) for m in norms} == {torch.nn.BatchNorm2d}
    assert norms[-1].weight.requires_grad  # the last stage trains (trainable_layers: 5)
    # torchvision's mobilenet_backbone names: body.<index of the block in features>
    own = {k[len("backbone.body."):] for k in model.state_dict() if k.startswith("backbone.body.")}
    assert own == {k[len("features."):] for k in reference.state_dict()
                   if k.startswith("features.") and k[len("features."):].split(".")[0] in
                   {n for n, _ in body.named_children()}}
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(list(body(x).values())[-1], reference.features(x))
    with pytest.raises(UserError, match="mobilenet_v2 has no reduced tail"):
        build_model(dict(SMALL, backbone="mobilenet_v2"), [2])


@pytest.mark.parametrize("backbone, other", [("mobilenet_v2", "resnet18"),
                                             ("resnet18", "mobilenet_v2"),
                                             ("mobilenet_v3_large", "mobilenet_v2")])
def test_weights_of_another_architecture_are_an_error_not_a_random_backbone(
        tmp_path, backbone, other):
    path = tmp_path / f"{other}.pth"
    torch.save(getattr(torchvision.models, other)(weights=None).state_dict(), path)
    with pytest.raises(UserError, match=rf"model.weights: \d+ of the {backbone} backbone's \d+ "
                                        rf"tensors match the file's \d+ .*torchvision {backbone}"):
        build_model(dict(SMALL, backbone=backbone, reduced_tail=False, weights=str(path)), [2])


def test_a_file_missing_one_tensor_is_refused(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["layer4.1.conv2.weight"]
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"99 of the resnet18 backbone's 100 tensors.*"
                                        r"'layer4.1.conv2.weight'"):
        build_model(dict(SMALL, backbone="resnet18", weights=str(path)), [2])
