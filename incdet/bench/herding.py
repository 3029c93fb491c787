"""Benchmark section herding: seconds to rank a dataset's images by herding, per size."""
import time

import torch

from incdet.train.memory import rank_classes


def herding_time(num_images: list[int], classes: int = 10, dim: int = 64, quota: int = 20,
                 boxes_per_image: float = 2.5, seed: int = 0, repeats: int = 3) -> dict:
    """Seconds to rank every class by herding (up to ``quota`` each) for several dataset sizes,
    on random L2-normalised (image, class) features of ``dim`` channels (the FPN width)."""
    rng = torch.Generator().manual_seed(seed)
    out = {}
    for n in num_images:
        feats = {}
        pairs = int(n * boxes_per_image)
        img = torch.randint(0, n, (pairs,), generator=rng).tolist()
        cls = torch.randint(0, classes, (pairs,), generator=rng).tolist()
        vecs = torch.nn.functional.normalize(torch.randn(pairs, dim, generator=rng), dim=1)
        for i, c, v in zip(img, cls, vecs):
            feats[(i, c)] = v
        best = float("inf")
        for _ in range(repeats):  # best of a few runs: the machine is shared and noisy
            t0 = time.perf_counter()
            rank_classes(feats, list(range(classes)), "herding", quota)
            best = min(best, time.perf_counter() - t0)
        out[n] = {"pairs": len(feats), "seconds": best}
    return out
