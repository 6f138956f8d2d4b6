"""Contract §4, max_pool_size: the threshold sample is uniform (unbiased), every positive still
counts in recall, the caller's RNG is untouched, and the sample is reproducible after a resume."""

from __future__ import annotations

import io

import pytest
import torch
from _support import TIGHT, make_pair, random_batch

from imbalanced_losses import Pool, RecallAtQuantileLoss, Rows

F64 = torch.float64
TAU = 1.0


def imbalanced_pool(n=20_000, pos_rate=0.01, seed=0):
    gen = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, generator=gen) < pos_rate).long()
    logits = torch.randn(n, 1, generator=gen, dtype=F64) + 3.0 * targets[:, None]
    return logits, targets


def uniform_sample_thresholds(pool, m, quantile, gen, draws=300):
    """Thresholds of `draws` uniform samples (without replacement) of m pool rows: the target."""
    return torch.stack(
        [
            torch.quantile(
                pool[torch.randperm(pool.numel(), generator=gen)[:m]],
                1 - quantile,
                interpolation="higher",
            )
            for _ in range(draws)
        ]
    )


def recall_loss_at(theta, positives):
    return 1.0 - torch.sigmoid((positives - theta) / TAU).mean()


def recover_theta(loss, positives, pool):
    """Invert the (strictly increasing in theta) binary loss by bisection, then snap to the pool
    value it must be ('higher' picks an element of the sample, a subset of the pool)."""
    lo, hi = float(pool.min()) - 50.0, float(pool.max()) + 50.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if recall_loss_at(mid, positives) < loss:
            lo = mid
        else:
            hi = mid
    theta = 0.5 * (lo + hi)
    nearest = pool[(pool - theta).abs().argmin()]
    assert abs(float(nearest) - theta) < 1e-8, (
        "the loss is not 1 - recall over ALL positives at a pool value"
    )
    return nearest


def test_threshold_sample_is_unbiased_and_every_positive_counts():
    logits, targets = imbalanced_pool()
    pool = logits[:, 0]
    positives = pool[targets == 1]
    m, quantile = 2000, 0.05
    loss_fn = RecallAtQuantileLoss(
        1, quantile=quantile, queue_size=0, temperature=TAU, max_pool_size=m
    ).double()
    full_theta = torch.quantile(pool, 1 - quantile, interpolation="higher")

    # What a uniform sample without replacement of m rows gives, simulated here.
    gen = torch.Generator().manual_seed(123)
    simulated = uniform_sample_thresholds(pool, m, quantile, gen)
    sim_mean, sim_sd = simulated.mean(), simulated.std()

    thetas = []
    for _ in range(20):
        x = logits.clone().requires_grad_(True)
        loss = loss_fn(x, targets)
        theta = recover_theta(loss.detach(), positives, pool)
        thetas.append(theta)
        # Exactly 1 - mean sigmoid over every positive at that threshold, and every positive
        # (and no negative) gets the sigmoid's gradient.
        torch.testing.assert_close(loss.detach(), recall_loss_at(theta, positives), **TIGHT)
        (grad,) = torch.autograd.grad(loss, x)
        z = torch.sigmoid((positives - theta) / TAU)
        expected = -(z * (1 - z)) / TAU / positives.numel()
        torch.testing.assert_close(grad[targets == 1, 0], expected, rtol=1e-9, atol=1e-15)
        assert torch.equal(grad[targets == 0], torch.zeros_like(grad[targets == 0]))
    thetas = torch.stack(thetas)
    assert len(set(thetas.tolist())) > 1, "max_pool_size did not subsample (or reused one sample)"
    # Each draw is a plausible uniform-sample threshold, and on average they sit where a uniform
    # sample sits (a positive quota of 25% would put theta near 3.8; here it is near 1.7).
    assert (thetas - sim_mean).abs().max() < 6 * sim_sd, (thetas, sim_mean, sim_sd)
    tolerance = 5 * sim_sd / len(thetas) ** 0.5
    assert abs(thetas.mean() - sim_mean) < tolerance, (thetas.mean(), sim_mean)
    assert abs(sim_mean - full_theta) < 3 * sim_sd  # the uniform sample itself is near the truth


def test_global_rng_untouched():
    loss_fn = RecallAtQuantileLoss(3, quantile=0.1, queue_size=64, max_pool_size=16)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(99)
    state = torch.get_rng_state()
    for _ in range(4):
        logits, targets, _ = random_batch(gen, 40, 3, dtype=torch.float32)
        loss_fn(logits, targets)
    assert torch.equal(torch.get_rng_state(), state)


def _run(loss_fn, batches):
    return [loss_fn(logits, targets) for logits, targets in batches]


def _batches(seed, steps=6, n=40, num_classes=3):
    gen = torch.Generator().manual_seed(seed)
    return [random_batch(gen, n, num_classes, ties=False)[:2] for _ in range(steps)]


def test_same_seed_and_history_give_the_same_sample():
    batches = _batches(1)
    a = RecallAtQuantileLoss(3, quantile=0.1, queue_size=64, max_pool_size=16, seed=5).double()
    b = RecallAtQuantileLoss(3, quantile=0.1, queue_size=64, max_pool_size=16, seed=5).double()
    torch.manual_seed(0)
    first = _run(a, batches)
    torch.manual_seed(1)  # the caller's RNG does not matter
    second = _run(b, batches)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_different_seeds_draw_different_samples():
    # torch's CPU generator keeps only 32 bits of a seed; seeds must still matter.
    batches = _batches(1)
    losses = []
    for seed in (0, 1, 2**32, 5 * 2**32):
        loss = RecallAtQuantileLoss(3, quantile=0.1, queue_size=64, max_pool_size=16, seed=seed)
        losses.append(_run(loss.double(), batches))
    for i in range(len(losses)):
        for j in range(i + 1, len(losses)):
            assert not all(torch.equal(x, y) for x, y in zip(losses[i], losses[j])), (i, j)


def test_sample_reproducible_after_state_dict_round_trip():
    batches = _batches(2, steps=8)
    kwargs = dict(quantile=0.1, queue_size=64, max_pool_size=16, seed=3, temperature=0.2)
    original = RecallAtQuantileLoss(3, **kwargs).double()
    _run(original, batches[:4])
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    resumed = RecallAtQuantileLoss(3, **kwargs).double()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    rest_a = _run(original, batches[4:])
    rest_b = _run(resumed, batches[4:])
    assert all(torch.equal(x, y) for x, y in zip(rest_a, rest_b))
    # And a run that did not resume (fresh step counter) draws different samples.
    fresh = RecallAtQuantileLoss(3, **kwargs).double()
    fresh.queue.load_state_dict(original.queue.state_dict())
    rest_c = _run(fresh, batches[4:])
    assert not all(torch.equal(x, y) for x, y in zip(rest_a, rest_c))


@pytest.mark.parametrize("interpolation", ["higher", "linear"])
def test_pool_not_larger_than_max_pool_size_is_not_subsampled(interpolation):
    lib, ref = make_pair(
        3,
        quantile=0.1,
        queue_size=30,
        temperature=0.2,
        quantile_interpolation=interpolation,
        max_pool_size=50,
    )
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):  # pools of 20, 40, 50, 50 rows
        logits, targets, _ = random_batch(gen, 20, 3)
        torch.testing.assert_close(lib(logits, targets), ref(logits, targets), **TIGHT)


def test_threshold_sample_covers_queue_rows_too():
    # Live rows ~ N(0, 1), queued rows ~ N(4, 1): the pool's 70th percentile lies in the queue's
    # mass, so a sample drawn from the live rows only (or misaligned with the queue) is far off.
    gen = torch.Generator().manual_seed(8)
    n, m, quantile = 6000, 1500, 0.3
    live_targets = (torch.rand(n, generator=gen) < 0.05).long()
    live = torch.randn(n, 1, generator=gen, dtype=F64) + live_targets[:, None]
    queued_targets = (torch.rand(n, generator=gen) < 0.05).long()
    queued = torch.randn(n, 1, generator=gen, dtype=F64) + 4.0 + queued_targets[:, None]
    loss_fn = RecallAtQuantileLoss(
        1, quantile=quantile, queue_size=n, temperature=TAU, max_pool_size=m
    ).double()
    loss_fn.queue.push(queued, queued_targets)
    loss_fn.eval()  # keep the queue fixed across the draws
    pool = torch.cat([live, queued])[:, 0]
    positives = pool[torch.cat([live_targets, queued_targets]) == 1]
    simulated = uniform_sample_thresholds(pool, m, quantile, gen)
    sim_mean, sim_sd = simulated.mean(), simulated.std()

    def theta_at(step: int) -> torch.Tensor:
        # Eval forwards never move the sample stream on: put it where training step `step` is.
        loss_fn.subsample_step = step
        return recover_theta(loss_fn(live, live_targets), positives, pool)

    thetas = torch.stack([theta_at(step) for step in range(15)])
    assert len(set(thetas.tolist())) > 1
    assert (thetas - sim_mean).abs().max() < 6 * sim_sd, (thetas, sim_mean, sim_sd)
    assert abs(thetas.mean() - sim_mean) < 5 * sim_sd / len(thetas) ** 0.5


@pytest.mark.parametrize("n_live, n_queued", [(5, 7), (1, 4), (6, 1), (0, 6), (6, 0)])
def test_threshold_sample_rows_are_exactly_the_indexed_pool_rows(n_live, n_queued):
    # threshold_rows index the pool as if live and queued rows were concatenated; the blocks
    # are gathered separately, so check every row, the live/queue boundary included.
    gen = torch.Generator().manual_seed(n_live * 10 + n_queued)
    live = torch.randn(n_live, 3, generator=gen, dtype=F64, requires_grad=True)
    queued = torch.randn(n_queued, 3, generator=gen, dtype=F64)

    def rows(scores):
        n = scores.shape[0]
        return Rows(scores, torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=F64))

    total = n_live + n_queued
    boundary = [i for i in (n_live - 1, n_live) if 0 <= i < total]
    sample = torch.cat([torch.tensor(boundary), torch.randperm(total, generator=gen)])
    pool = Pool(rows(live), rows(queued), num_classes=3, threshold_rows=sample)
    (block,) = pool.threshold_blocks()
    assert torch.equal(block, torch.cat([live.detach(), queued])[sample])
    assert not block.requires_grad
