"""The traffic counter of ``_distributed`` on 2 gloo ranks: the bytes each rank receives, per
collective, equal what the tensors' shapes say (an all_gather: every rank's block, its own and
the padding included; an all_reduce: the reduced tensor), in forward and in backward.

The expected numbers are written from shapes and dtypes here, never read from the counter."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from imbalanced_losses import (
    RecallAtQuantileLoss,
    _distributed,
    all_gather_no_grad,
    all_gather_with_grad,
)
from imbalanced_losses._distributed import Traffic
from imbalanced_losses.testing import run_ranks

SIZES = (3, 1)  # uneven: the row gathers pad to 3 rows per rank
WORLD = len(SIZES)
C = 5
F32, F64, I64 = 4, 8, 8  # bytes per element


def _delta(before: Traffic, after: Traffic) -> dict[str, int]:
    keys = ("calls", "bytes", "reduced", "gathered", "rows")
    return {k: getattr(after, k) - getattr(before, k) for k in keys}


@contextmanager
def _counting() -> Iterator[dict[str, int]]:
    """The counter's increase over the block (filled in when the block ends)."""
    before = _distributed.traffic()
    got: dict[str, int] = {}
    yield got
    got.update(_delta(before, _distributed.traffic()))


def _traffic_on_rank(rank: int) -> dict[str, dict[str, int]]:
    n = SIZES[rank]
    with _counting() as equal_shape:
        _distributed.all_gather_rows_of_equal_shape(torch.zeros(2, 3, dtype=torch.float64))
    with _counting() as rows_no_grad:
        _distributed.gather_rows(torch.zeros(n, C), list(SIZES))
    with _counting() as rows_all_empty:
        _distributed.gather_rows(torch.zeros(0, C), [0, 0])
    with _counting() as no_grad_public:
        all_gather_no_grad(torch.zeros(n, C))

    x = torch.randn(n, C, dtype=torch.float64, requires_grad=True)
    with _counting() as with_grad_forward:
        gathered = all_gather_with_grad(x)
    with _counting() as with_grad_backward:
        gathered.sum().backward()

    scores = torch.randn(n, C, requires_grad=True)
    with _counting() as own_column_forward:
        own = _distributed.gather_own_column(
            scores, torch.zeros(n, dtype=torch.long), torch.zeros(n, 2), list(SIZES)
        )[2]
    with _counting() as own_column_backward:
        own.sum().backward()

    with _counting() as reduce_sum:
        _distributed.all_reduce_sum(torch.zeros(7, dtype=torch.float64))
    with _counting() as reduce_min:
        _distributed.all_reduce_min(torch.zeros(C, 256, dtype=torch.int32))
    _distributed.reset_traffic()
    after_reset = _delta(Traffic(), _distributed.traffic())
    return {
        "equal_shape": equal_shape,
        "rows_no_grad": rows_no_grad,
        "rows_all_empty": rows_all_empty,
        "no_grad_public": no_grad_public,
        "with_grad_forward": with_grad_forward,
        "with_grad_backward": with_grad_backward,
        "own_column_forward": own_column_forward,
        "own_column_backward": own_column_backward,
        "reduce_sum": reduce_sum,
        "reduce_min": reduce_min,
        "after_reset": after_reset,
    }


def _expect(reduced: int = 0, gathered: int = 0, rows: int = 0, calls: int = 0) -> dict:
    return {
        "calls": calls,
        "bytes": reduced + gathered,
        "reduced": reduced,
        "gathered": gathered,
        "rows": rows,
    }


def test_every_collective_counts_the_bytes_each_rank_receives():
    padded = max(SIZES)
    sizes_gather = WORLD * 1 * I64  # gather_sizes: one int64 per rank
    expected = {
        # every rank's [2, 3] float64 block, this rank's own included
        "equal_shape": _expect(gathered=WORLD * 2 * 3 * F64, calls=1),
        # uneven rows travel padded to the longest rank's count
        "rows_no_grad": _expect(
            gathered=WORLD * padded * C * F32, rows=WORLD * padded * C * F32, calls=1
        ),
        "rows_all_empty": _expect(),  # no rows anywhere: no collective
        "no_grad_public": _expect(
            gathered=sizes_gather + WORLD * padded * C * F32,
            rows=WORLD * padded * C * F32,
            calls=2,
        ),
        "with_grad_forward": _expect(
            gathered=sizes_gather + WORLD * padded * C * F64,
            rows=WORLD * padded * C * F64,
            calls=2,
        ),
        # the backward all-reduces the gradient of the whole gathered (unpadded) tensor
        "with_grad_backward": _expect(reduced=sum(SIZES) * C * F64, calls=1),
        # packed: C scores + 2 extra columns + the own-column index, in the scores' dtype
        "own_column_forward": _expect(
            gathered=WORLD * padded * (C + 3) * F32, rows=WORLD * padded * (C + 3) * F32, calls=1
        ),
        "own_column_backward": _expect(),  # the replicated rule: no collective in backward
        "reduce_sum": _expect(reduced=7 * F64, calls=1),
        "reduce_min": _expect(reduced=C * 256 * 4, calls=1),
        "after_reset": _expect(),
    }
    for rank, got in enumerate(run_ranks(_traffic_on_rank, WORLD, timeout_s=180)):
        for name, want in expected.items():
            assert got[name] == want, (rank, name, got[name], want)


def _loss_traffic_on_rank(rank: int) -> dict[int, dict[str, dict[str, int]]]:
    """The gathered recall loss: one forward and backward at two batch sizes, no queue."""
    out = {}
    for n in (8, 16):
        loss_fn = RecallAtQuantileLoss(3, quantile=0.3, queue_size=0)
        logits = torch.randn(n, 3, requires_grad=True)
        with _counting() as forward:
            loss = loss_fn(logits, torch.arange(n) % 3)
        with _counting() as backward:
            loss.backward()
        out[n] = {"forward": forward, "backward": backward}
    return out


def test_the_gathered_loss_receives_rows_in_proportion_to_the_global_batch():
    for rank, got in enumerate(run_ranks(_loss_traffic_on_rank, WORLD, timeout_s=180)):
        small, large = got[8], got[16]
        # Rows: W x N x a fixed width, so doubling N doubles them; metadata does not move.
        assert (
            small["forward"]["rows"] > 0
            and large["forward"]["rows"] == 2 * small["forward"]["rows"]
        )
        assert (row_bytes := small["forward"]["rows"]) % (WORLD * 8 * 4) == 0, (rank, row_bytes)
        metadata = {n: got[n]["forward"]["gathered"] - got[n]["forward"]["rows"] for n in got}
        assert metadata[8] == metadata[16] > 0, (rank, metadata)
        assert small["forward"]["reduced"] == large["forward"]["reduced"] == 0
        assert small["backward"] == large["backward"] == _expect(), (rank, got)
