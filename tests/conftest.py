import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small built-in dataset (64 px images) shared by the end-to-end tests."""
    from incdet.data import synthetic

    root = tmp_path_factory.mktemp("shapes")
    synthetic.generate(root, num_train=48, num_val=16, image_size=64, seed=3, progress=False)
    return root


@pytest.fixture
def tiny_config(tiny_dataset, tmp_path) -> Path:
    """A config for fast CPU runs on the tiny dataset."""
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""
data:
  root: {tiny_dataset}
  synthetic: {{generate: false}}
split: "4+3+3"
model:
  min_size: 64
  max_size: 64
  fpn_channels: 16
  head_convs: 1
train:
  max_iters: 3
  batch_size: 4
  num_workers: 0
  warmup_iters: 1
  log_every: 1
eval:
  batch_size: 8
""")
    return path


def write_coco(path: Path, images, annotations, categories) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))
    return path
