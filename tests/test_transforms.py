import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from incdet.base.config import DEFAULTS
from incdet.data.transforms import apply_transform, build_train_transform

AUG = dict(DEFAULTS["augment"], hflip=0.5, scale_p=1.0, crop_p=0.5, brightness_contrast_p=1.0)
TRANSFORM = build_train_transform(AUG)


@st.composite
def boxes_and_labels(draw):
    w, h = draw(st.integers(16, 96)), draw(st.integers(16, 96))
    n = draw(st.integers(0, 6))
    boxes = []
    for _ in range(n):
        x0 = draw(st.floats(0, w - 1.5))
        y0 = draw(st.floats(0, h - 1.5))
        boxes.append([x0, y0, draw(st.floats(x0 + 1, w)), draw(st.floats(y0 + 1, h))])
    labels = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
    return w, h, np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64)


@settings(max_examples=60, deadline=None)
@given(boxes_and_labels(), st.integers(0, 2**31 - 1))
def test_transform_keeps_boxes_valid_and_labels_integer(data, seed):
    w, h, boxes, labels = data
    TRANSFORM.set_random_seed(seed)
    image = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    img, out_boxes, out_labels = apply_transform(TRANSFORM, image, boxes, labels)
    oh, ow = img.shape[:2]
    assert out_boxes.shape == (len(out_labels), 4)
    assert out_labels.dtype == np.int64
    assert set(out_labels.tolist()) <= set(labels.tolist())
    if len(out_boxes):
        assert (out_boxes[:, 2] - out_boxes[:, 0] >= 1).all()
        assert (out_boxes[:, 3] - out_boxes[:, 1] >= 1).all()
        assert (out_boxes[:, :2] >= 0).all()
        assert (out_boxes[:, 2] <= ow).all() and (out_boxes[:, 3] <= oh).all()


def test_hflip_only_mirrors_boxes():
    t = build_train_transform({"hflip": 1.0, "scale": None, "crop_p": 0,
                               "brightness_contrast_p": 0})
    image = np.zeros((20, 40, 3), np.uint8)
    _, boxes, labels = apply_transform(t, image, np.array([[2, 3, 12, 9]], np.float32),
                                       np.array([4]))
    np.testing.assert_allclose(boxes, [[28, 3, 38, 9]])
    assert labels.tolist() == [4]


def test_no_augmentation_is_identity():
    assert build_train_transform({"hflip": 0, "scale": None, "crop_p": 0,
                                  "brightness_contrast_p": 0}) is None
    image = np.zeros((10, 10, 3), np.uint8)
    _, boxes, labels = apply_transform(None, image, np.array([[1, 1, 5, 5], [3, 3, 3, 8]],
                                                             np.float32), np.array([1, 2]))
    assert boxes.tolist() == [[1, 1, 5, 5]] and labels.tolist() == [1]
