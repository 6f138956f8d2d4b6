"""The ``max_pool_size`` sample: uniform rows without replacement, in O(sample) host work."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def uniform_sample(n: int, k: int, generator: torch.Generator) -> Tensor:
    """``k`` distinct indices of ``range(n)``, uniform without replacement, in O(k log k).

    Every ``k``-subset is equally likely, in a uniformly random order. Draws
    with replacement are exact for this: the distinct values of an i.i.d.
    uniform stream, in order of first appearance, are a uniformly random
    permutation, so its first ``k`` are the sample. For ``k <= n / 4`` that
    takes under ``1.16 k`` draws on average; above, ``randperm(n)`` costs
    O(n) = O(k). Host work on ``generator`` (deterministic: same on every rank).
    """
    if not 0 <= k <= n:
        raise ValueError(f"cannot draw {k} distinct rows from {n}")
    if 4 * k > n:
        return torch.randperm(n, generator=generator)[:k]
    # Expected draws for k distinct: n * (H(n) - H(n - k)) <= n * log(n / (n - k)) + 1.
    draws = torch.empty(0, dtype=torch.long)
    wanted = math.ceil(1.05 * n * math.log(n / (n - k))) + 16
    while True:
        draws = torch.cat([draws, torch.randint(n, (wanted,), generator=generator)])
        distinct, inverse = torch.unique(draws, return_inverse=True)
        if distinct.shape[0] >= k:
            break
        wanted = 2 * (k - distinct.shape[0]) + 16  # rare: top up the same stream
    positions = torch.arange(draws.shape[0])
    first = torch.full_like(distinct, draws.shape[0]).scatter_reduce_(0, inverse, positions, "amin")
    return draws[first.sort().values[:k]]
