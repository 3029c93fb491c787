"""The torch ``Dataset`` over :class:`ImageRecord`s, its collate function and data loaders.

A sample is ``(image, target)``: ``image`` a float CHW tensor in [0, 1]; ``target`` holds
``boxes`` (N, 4) xyxy, ``labels`` (N,) model label indices, ``image_id``, ``label_space``: the
label indices the image is annotated for (the classification loss treats only those channels as
background on that image, README, "Missing annotations"), and ``replayed``: whether it is a
memory image replayed from an earlier step.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from incdet.base.errors import UserError
from incdet.data.records import ImageRecord
from incdet.data.transforms import apply_transform


def read_image(path: str) -> np.ndarray:
    """An RGB image as HWC uint8; a clear error names an unreadable file."""
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read image ({e}); replace or remove it") from None


class DetectionDataset(torch.utils.data.Dataset):
    """Args:
        records: the images and their (already step-filtered) boxes.
        label_of: category id -> model label index.
        label_spaces: per record, the label indices it is annotated for.
        transform: an albumentations pipeline (or None).
        num_replayed: the last ``num_replayed`` records are replayed memory images.
    """

    def __init__(self, records: Sequence[ImageRecord], label_of: dict[int, int],
                 label_spaces: Sequence[Sequence[int]], transform=None, num_replayed: int = 0):
        if len(label_spaces) != len(records):
            raise ValueError("one label space per record is required")
        self.first_replayed = len(records) - num_replayed
        self.records = list(records)
        self.label_of = dict(label_of)
        self.label_spaces = [torch.as_tensor(sorted(s), dtype=torch.int64) for s in label_spaces]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        rec = self.records[index]
        image = read_image(rec.path)
        if image.shape[0] != rec.height or image.shape[1] != rec.width:
            raise UserError(f"{rec.path}: image is {image.shape[1]}x{image.shape[0]} but its "
                            f"annotation says {rec.width}x{rec.height}; fix the annotation")
        labels = np.array([self.label_of[int(c)] for c in rec.category_ids], np.int64)
        image, boxes, labels = apply_transform(self.transform, image, rec.boxes, labels)
        tensor = to_tensor(image)
        target = {"boxes": torch.from_numpy(boxes).float(), "labels": torch.from_numpy(labels),
                  "image_id": rec.id, "label_space": self.label_spaces[index],
                  "replayed": index >= self.first_replayed}
        return tensor, target


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> CHW float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


def collate(batch):
    return tuple(zip(*batch))


def make_loader(dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int,
                drop_last: bool = False, batch_sampler=None,
                device=None) -> torch.utils.data.DataLoader:
    """A loader whose shuffling is seeded by ``seed`` (or driven by ``batch_sampler``). For a
    CUDA ``device`` the batches come in pinned memory, so that their copies to the GPU
    (``non_blocking``) do not make the host wait."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    # albumentations 2.x: a Compose draws from its own generators, seeded from OS entropy
    # unless given a seed (global seeds do not reach it). Loader processes reseed their copy
    # (worker_init_fn); without them the batches are augmented here, by this copy: seed it,
    # or every process augments differently and training is not reproducible.
    transform = getattr(dataset, "transform", None)
    if num_workers == 0 and transform is not None and hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed % 2**32)
    common = {"num_workers": num_workers, "collate_fn": collate, "generator": generator,
              "persistent_workers": num_workers > 0,
              "pin_memory": device is not None and torch.device(device).type == "cuda"}
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **common)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                       drop_last=drop_last, **common)
