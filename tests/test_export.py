"""Export to TorchScript and ONNX, loading in a process without incdet, the Python API and the
inference tool."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from incdet.base.config import load_config, with_defaults
from incdet.base.errors import UserError
from incdet.deploy.detector import Detector, load_detector
from incdet.deploy.export import ExportModule, export, sample_images
from incdet.experiment.step import run_step
from incdet.model.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from incdet.model.heads import IncrementalClassificationHead
from incdet.model.torchvision import fuse_classifiers

from conftest import ROOT

SIZES = ((64, 64), (48, 80), (75, 55))


@pytest.fixture(scope="module")
def grown_checkpoint(tiny_dataset, tmp_path_factory):
    """A model after two steps (5 classes + 5), with every detection kept (score_thresh 0) and
    classifier weights spread out so that scores are distinct (no ties to order arbitrarily)."""
    tmp = tmp_path_factory.mktemp("export")
    path = tmp / "tiny.yaml"
    path.write_text(f"""
data: {{root: {tiny_dataset}, synthetic: {{generate: false}}}}
split: "5+5"
model: {{min_size: 64, max_size: 64, fpn_channels: 16, head_convs: 1, score_thresh: 0.0,
        detections_per_img: 30}}
train: {{max_iters: 2, batch_size: 4, num_workers: 0, warmup_iters: 1}}
memory: {{budget: 0}}
""")
    cfg = load_config(path)
    run_step(cfg, 0, tmp / "w", progress=False)
    run_step(cfg, 1, tmp / "w", progress=False)
    ckpt_path = tmp / "w" / "step_1" / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path)
    gen = torch.Generator().manual_seed(0)
    for k, v in ckpt["model"].items():
        if "classifiers" in k or "bbox_reg" in k:
            ckpt["model"][k] = v + 0.3 * torch.randn(v.shape, generator=gen)
    spread = tmp / "spread.pt"
    save_checkpoint(spread, ckpt)
    return spread


def test_fused_head_equals_the_per_step_head():
    head = IncrementalClassificationHead(16, 3, [4, 2, 3], num_convs=1)
    for clf in head.classifiers:
        torch.nn.init.normal_(clf.weight, std=0.5)
        torch.nn.init.normal_(clf.bias)
    x = torch.randn(2, 16, 5, 7)
    t = head.conv(x)
    fused = fuse_classifiers(head.classifiers, head.classes_per_step, 3)(t)  # (N, A*K, H, W)
    n, _, h, w = fused.shape
    expected = fused.view(n, 3, 9, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 9)
    torch.testing.assert_close(head.forward_level(x), expected, rtol=1e-5, atol=1e-5)


def test_load_detector_is_a_plain_torchvision_retinanet(grown_checkpoint):
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.retinanet import RetinaNetHead

    model = load_detector(grown_checkpoint)
    assert type(model) is RetinaNet and type(model.head) is RetinaNetHead and not model.training
    meta = model.incdet_meta
    assert meta["category_ids"] == [1, 2, 4, 5, 7, 9, 11, 14, 16, 18]
    assert meta["names"][:2] == ["circle", "triangle"]
    assert meta["steps"] == [[1, 2, 4, 5, 7], [9, 11, 14, 16, 18]]
    eager = model_from_checkpoint(load_checkpoint(grown_checkpoint))
    images = sample_images(SIZES)
    with torch.no_grad():
        for a, b in zip(eager(images), model(images)):
            assert len(a["boxes"]) == 30
            assert torch.equal(a["labels"], b["labels"])
            torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-4, atol=1e-3)
    # Detector maps labels to dataset category ids and names
    import incdet

    assert incdet.Detector is Detector and incdet.load_detector is load_detector
    det = Detector(model=model, score_thresh=0.0)
    preds = det.predict(images[0])
    assert len(preds) == 30
    ids = dict(zip(meta["category_ids"], meta["names"]))
    assert all(ids[c] == name for c, name, _, _ in preds)
    assert {c for c, *_ in preds} <= set(meta["category_ids"])


_CHILD = r"""
import json, sys
import numpy as np
fmt, model_path, images_path = sys.argv[1:]
arrays = np.load(images_path)
out = []
if fmt == "torchscript":
    import torch, torchvision  # torchvision registers the nms operator
    m = torch.jit.load(model_path)
    for k in sorted(arrays.files):
        with torch.no_grad():
            b, s, c = m(torch.from_numpy(arrays[k]))
        out.append([b.tolist(), s.tolist(), c.tolist()])
else:
    import onnxruntime as ort
    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    for k in sorted(arrays.files):
        b, s, c = sess.run(None, {"image": arrays[k]})
        out.append([b.tolist(), s.tolist(), c.tolist()])
assert "incdet" not in sys.modules
print(json.dumps(out))
"""


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_runs_without_incdet_and_matches_eager(grown_checkpoint, tmp_path, fmt):
    pytest.importorskip("onnxruntime") if fmt == "onnx" else None
    images = sample_images(SIZES)
    out = tmp_path / ("det.pt" if fmt == "torchscript" else "det.onnx")
    meta = export(grown_checkpoint, fmt, out, check_images=images)
    written = json.loads((tmp_path / (out.name + ".json")).read_text())
    assert written == meta and written["category_ids"] == [1, 2, 4, 5, 7, 9, 11, 14, 16, 18]
    assert written["steps"][1] == [9, 11, 14, 16, 18] and written["format"] == fmt
    np.savez(tmp_path / "images.npz", **{f"{i:02d}": img.numpy() for i, img in enumerate(images)})
    r = subprocess.run([sys.executable, "-c", _CHILD, fmt, str(out), str(tmp_path / "images.npz")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    module = ExportModule(load_detector(grown_checkpoint), meta["category_ids"]).eval()
    for img, (boxes, scores, ids) in zip(images, got):
        with torch.no_grad():
            rb, rs, ri = module(img)
        assert len(boxes) == len(rb) == 30
        assert ids == ri.tolist() and set(ids) <= set(meta["category_ids"])
        torch.testing.assert_close(torch.tensor(boxes), rb, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(torch.tensor(scores), rs, rtol=1e-4, atol=1e-5)
        # boxes are in input pixels of this image's size
        h, w = img.shape[1:]
        assert float(rb[:, 2].max()) <= w + 1e-3 and float(rb[:, 3].max()) <= h + 1e-3


def test_export_refuses_a_mismatch_and_writes_nothing(grown_checkpoint, tmp_path, monkeypatch):
    import incdet.deploy.export as ex

    monkeypatch.setattr(ex, "compare", lambda ref, got: "image 0: boxes differ by up to 3 px")
    out = tmp_path / "det.pt"
    with pytest.raises(UserError, match="disagrees with the eager model.*3 px"):
        export(grown_checkpoint, "torchscript", out, check_images=sample_images(SIZES[:1]))
    assert list(tmp_path.iterdir()) == []


def test_infer_tool_writes_results_and_drawings(grown_checkpoint, tmp_path, tiny_dataset):
    images = sorted((tiny_dataset / "images" / "val").iterdir())[:3]
    folder = tmp_path / "photos"  # a folder of images, and an image file
    folder.mkdir()
    for img in images[:2]:
        shutil.copy(img, folder / img.name)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "tools/infer.py", "--checkpoint", str(grown_checkpoint),
                        "--images", str(folder), str(images[2]), "--out-dir", str(out),
                        "--no-progress", "--score-thresh", "0.0"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    dets = json.loads((out / "detections.json").read_text())
    assert {d["image_id"] for d in dets} == {1, 2, 3} and len(dets) == 90
    assert sorted({d["file_name"] for d in dets}) == sorted(
        [str(folder / img.name) for img in images[:2]] + [str(images[2])])
    assert all(len(d["bbox"]) == 4 and d["bbox"][2] >= 0 for d in dets)
    assert {d["category_id"] for d in dets} <= {1, 2, 4, 5, 7, 9, 11, 14, 16, 18}
    for img in images:
        assert (out / f"{img.stem}.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, "tools/infer.py", "--model", str(tmp_path / "no.onnx"),
                          "--images", str(images[0]), "--out-dir", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no.onnx: model file not found" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_checkpoint_trained_on_cuda_loads_where_there_is_none(grown_checkpoint, tmp_path):
    from incdet.deploy.export import Runner

    ckpt = load_checkpoint(grown_checkpoint)
    ckpt["config"]["train"]["device"] = "cuda"
    path = tmp_path / "cuda.pt"
    save_checkpoint(path, ckpt)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_detector(path)  # auto: where this machine can run it
    assert next(model.parameters()).device.type == expected
    assert next(load_detector(path, "cpu").parameters()).device.type == "cpu"
    det = Detector(path, score_thresh=0.0)
    assert det.device.type == expected and len(det.predict(sample_images(SIZES)[0])) == 30
    boxes, scores, ids = Runner(checkpoint=path, device="cpu")(sample_images(SIZES)[0])
    assert isinstance(boxes, np.ndarray) and len(boxes) == len(scores) == len(ids) == 30
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device: 'cuda' requested but CUDA is not available"):
            load_detector(path, "cuda")


def test_state_dict_export_is_what_a_torchvision_user_loads_and_imports(grown_checkpoint,
                                                                        tmp_path):
    """--format state_dict: a plain torchvision state dict (data-only load) whose RetinaNet,
    rebuilt from the checkpoint's model settings, detects exactly as the checkpoint; imported
    back with --arch incdet and OUT.json as --classes, it is the same detector again."""
    from incdet.experiment.importer import import_detector
    from incdet.model.torchvision import load_torchvision, read_classes, slot_classes

    images = sample_images(SIZES)
    out = tmp_path / "det_state.pt"
    meta = export(grown_checkpoint, "state_dict", out, check_images=images)
    assert json.loads((tmp_path / "det_state.pt.json").read_text()) == meta
    state = torch.load(out, weights_only=True)
    reference = load_detector(grown_checkpoint, "cpu")
    assert list(state) == list(reference.state_dict())
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in state.items())
    ckpt = load_checkpoint(grown_checkpoint)
    cfg = with_defaults(ckpt["config"])
    # OUT.json names the architecture --arch incdet rebuilds; other settings are refused with it
    assert meta["model"] == {k: v for k, v in cfg["model"].items() if k != "weights"}
    other = dict(cfg["model"], backbone="mobilenet_v2", reduced_tail=False)
    with pytest.raises(UserError, match=r'does not fit incdet: .*OUT.json, under "model"'):
        load_torchvision(out, "incdet", str(out), other)
    rebuilt = load_torchvision(out, "incdet", str(out), meta["model"])
    slots = slot_classes(10, read_classes(tmp_path / "det_state.pt.json"), "det_state.pt.json")
    assert [s["id"] for s in slots] == meta["category_ids"]
    import_detector(rebuilt, slots, cfg, tmp_path / "imported", str(out), progress=False)
    imported = load_detector(tmp_path / "imported" / "step_0" / "checkpoint.pt", "cpu")
    assert imported.incdet_meta["category_ids"] == meta["category_ids"]
    with torch.no_grad():
        for a, b in zip(reference(images), imported(images)):
            assert torch.equal(a["labels"], b["labels"])
            torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-4)
            torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-6)
