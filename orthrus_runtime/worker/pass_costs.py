"""PassCosts: the measured seconds of each device pass, by (kind, padded batch, padded
tokens): CUDA-graph replay times on the GPU, wall-clock on the CPU. The runner records
them; the adaptive verify planner reads them."""
from __future__ import annotations

import numpy as np

from orthrus_runtime.worker.cuda_graphs import BATCH_SIZES, TOKEN_SIZES, bucket


def batch_bucket(bs: int) -> int:
    return bucket(bs, BATCH_SIZES) or bs


def token_bucket(T: int) -> int:
    return bucket(T, TOKEN_SIZES) or T


class PassCosts:
    """Seconds per pass, keyed (kind, padded batch, padded tokens); kind 'draft' or 'verify'."""

    def __init__(self, ema: float = 0.3):
        self.table: dict[tuple[str, int, int], float] = {}
        self.ema = ema
        self.version = 0  # bumped on every change, so that users can cache estimates

    def record(self, kind: str, bs: int, T: int, seconds: float, replace: bool = False) -> None:
        key = (kind, batch_bucket(bs), token_bucket(T))
        old = self.table.get(key)
        self.table[key] = seconds if old is None or replace else (1 - self.ema) * old + self.ema * seconds
        self.version += 1

    def estimate(self, kind: str, bs: int, T: int) -> float:
        """Measured value, else scaled from the nearest measurement: at least what a smaller
        pass costs, growing with the square root of the token ratio (between a memory-bound
        pass, flat, and a compute-bound one, linear). On the GPU every captured pass is
        measured ahead; on the CPU this optimism gets a candidate tried, hence measured."""
        bs, T = batch_bucket(bs), token_bucket(T)
        exact = self.table.get((kind, bs, T))
        if exact is not None:
            return exact
        other = "verify" if kind == "draft" else "draft"
        for kinds in ((kind,), (kind, other)):
            pts = [(b, t, c) for (k, b, t), c in self.table.items() if k in kinds]
            if pts:
                b, t, c = min(pts, key=lambda p: (abs(np.log2(p[0] / bs)), abs(np.log2(p[1] / T))))
                return c * max(1.0, (bs * T) / (b * t)) ** 0.5
        return 1e-3 * (1.0 + bs * T / 64.0)  # nothing measured yet: relative costs only
