"""LossWarmupWrapper: its schedule against hand-computed tables, the main loss's queue during the
warm-up, eval steps, resuming from a state_dict mid-blend and mid-decay, and bad arguments."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from imbalanced_losses import LossWarmupWrapper, RecallAtQuantileLoss

# Tiny batches make tiny pools on purpose; the recall loss's warning about them is noise here.
pytestmark = pytest.mark.filterwarnings("ignore:the pool holds .* too few for quantile")


class Constant(nn.Module):
    """A loss worth ``value`` (connected to the logits), with a temperature to be set."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.temperature = 1.0
        self.calls = 0

    def forward(self, logits, targets):
        self.calls += 1
        return logits.sum() * 0.0 + self.value


def blended(wrapper):
    """The loss of one training step: warm-up loss 10, main loss 20, so w = (loss - 10) / 10."""
    logits = torch.zeros(2, 1, dtype=torch.float64, requires_grad=True)
    return float(wrapper(logits, torch.tensor([0, 1])).detach())


def wrap(**schedule):
    return LossWarmupWrapper(Constant(10.0), Constant(20.0), **schedule)


def test_steps_schedule_matches_the_worked_example():
    # W=500, B=3, f=1: 0.0 for steps 0..499, then 0.25, 0.50, 0.75, and 1.0 from step 503.
    table = {
        0: 0.0,
        1: 0.0,
        499: 0.0,
        500: 0.25,
        501: 0.5,
        502: 0.75,
        503: 1.0,
        504: 1.0,
        9999: 1.0,
    }
    wrapper = wrap(warmup_steps=500, blend_steps=3)
    for step, w in table.items():
        wrapper.on_train_batch_start(step)
        assert wrapper.main_weight == w, step
        assert wrapper.in_warmup == (step < 500) and wrapper.in_blend == (500 <= step < 503)
        assert blended(wrapper) == pytest.approx(10 + 10 * w, abs=1e-12)


def test_forwards_count_steps_without_the_hook():
    wrapper = wrap(warmup_steps=2, blend_steps=1, final_main_weight=0.8)
    seen = [blended(wrapper) for _ in range(5)]
    # w: 0, 0, 0.8 * 1/2, then 0.8.
    assert seen == pytest.approx([10.0, 10.0, 14.0, 18.0, 18.0], abs=1e-12)


def test_epoch_schedule_with_a_permanent_mix():
    # W=2, B=3, f=0.5: epochs 0, 1 -> 0; epochs 2, 3, 4 -> 0.125, 0.25, 0.375; then 0.5.
    wrapper = wrap(warmup_epochs=2, blend_epochs=3, final_main_weight=0.5)
    expected = [0.0, 0.0, 0.125, 0.25, 0.375, 0.5, 0.5]
    for epoch, w in enumerate(expected):
        wrapper.on_train_epoch_start(epoch)
        for _ in range(3):  # steps inside an epoch do not move an epoch schedule
            assert blended(wrapper) == pytest.approx(10 + 10 * w, abs=1e-12)
        assert wrapper.main_weight == w


def test_no_warmup_no_blend_is_the_main_loss_alone():
    wrapper = wrap()
    assert not wrapper.in_warmup and not wrapper.in_blend and wrapper.main_weight == 1.0
    assert blended(wrapper) == 20.0
    assert wrapper.warmup_loss.calls == 0


def test_temperature_decays_geometrically_from_the_first_step_after_warmup():
    wrapper = wrap(warmup_steps=3, temp_start=0.1, temp_end=0.001, temp_decay_steps=4)
    temperatures = []
    for _ in range(10):
        blended(wrapper)
        temperatures.append(wrapper.main_loss.temperature)
    # 0.1 * 0.01 ** (k / 4) for k = 0 .. 4 steps after the warm-up, then 0.001.
    after = [0.1, 0.1 * 0.01**0.25, 0.01, 0.1 * 0.01**0.75, 0.001, 0.001, 0.001]
    assert temperatures == pytest.approx([0.1, 0.1, 0.1] + after, rel=1e-12)


def test_temperature_decay_counts_steps_in_an_epoch_schedule_too():
    wrapper = wrap(warmup_epochs=1, temp_start=1.0, temp_end=0.25, temp_decay_steps=2)
    blended(wrapper)
    wrapper.on_train_epoch_start(1)
    temps = []
    for _ in range(3):
        temps.append(wrapper.current_temperature)
        blended(wrapper)
    assert temps == pytest.approx([1.0, 0.5, 0.25], rel=1e-12)


def test_main_loss_fills_its_queue_during_the_warmup_without_gradient():
    main = RecallAtQuantileLoss(1, quantile=0.2, queue_size=16, temperature=0.5).double()
    wrapper = LossWarmupWrapper(
        lambda x, y: nn.functional.binary_cross_entropy_with_logits(x[:, 0], y.double()),
        main,
        warmup_steps=2,
        temp_start=0.5,
        temp_end=0.5,
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(6, 1, dtype=torch.float64, generator=gen, requires_grad=True)
        y = (torch.rand(6, generator=gen) < 0.4).long()
        loss = wrapper(x, y)
        (grad,) = torch.autograd.grad(loss, x)
        bce = nn.functional.binary_cross_entropy_with_logits(x[:, 0], y.double())
        (bce_grad,) = torch.autograd.grad(bce, x)
        assert torch.equal(loss, bce) and torch.equal(grad, bce_grad)
    assert main.queue.count == 12  # both warm-up batches are queued
    assert wrapper.main_weight == 1.0


def test_eval_forwards_never_advance_the_schedule_nor_fill_the_queue():
    main = RecallAtQuantileLoss(1, quantile=0.2, queue_size=16).double()
    wrapper = LossWarmupWrapper(Constant(1.0), main, warmup_steps=1, temp_decay_steps=5)
    x, y = torch.randn(4, 1, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    wrapper(x, y)
    wrapper(x, y)
    before = (wrapper.step, wrapper.decay_step, wrapper.main_weight, wrapper.current_temperature)
    temperature, count = main.temperature, main.queue.count
    wrapper.eval()
    for _ in range(3):
        wrapper(x, y)
    assert (
        wrapper.step,
        wrapper.decay_step,
        wrapper.main_weight,
        wrapper.current_temperature,
    ) == before
    assert main.temperature == temperature and main.queue.count == count


@pytest.mark.parametrize("stop", [5, 6, 8])  # mid-blend, at the end of the blend, mid-decay
def test_resume_from_state_dict_continues_mid_blend_and_mid_decay(stop):
    def make():
        main = RecallAtQuantileLoss(1, quantile=0.3, queue_size=10).double()
        return LossWarmupWrapper(
            Constant(0.5), main, warmup_steps=3, blend_steps=4, final_main_weight=0.75,
            temp_start=0.5, temp_end=0.05, temp_decay_steps=6,
        )  # fmt: skip

    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(5, 1, dtype=torch.float64, generator=gen), torch.tensor([0, 1, 0, 0, 1]))
        for _ in range(12)
    ]
    straight, first = make(), make()
    expected = [float(straight(x, y)) for x, y in batches]
    for x, y in batches[:stop]:
        first(x, y)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert (resumed.step, resumed.decay_step) == (first.step, first.decay_step)
    assert resumed.main_loss.queue.count == first.main_loss.queue.count
    got = [float(resumed(x, y)) for x, y in batches[stop:]]
    assert got == expected[stop:]  # bit for bit: weights, temperatures and queue all resumed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(warmup_epochs=2, warmup_steps=10), "epochs or in steps, not both"),
        (dict(blend_epochs=1, blend_steps=0), "epochs or in steps, not both"),
        (dict(warmup_epochs=-1), "warmup_epochs must be an int >= 0, got -1"),
        (dict(blend_steps=2.5), "blend_steps must be None or an int >= 0, got 2.5"),
        (dict(final_main_weight=0.0), r"final_main_weight must be in \(0, 1\], got 0.0"),
        (dict(final_main_weight=1.5), r"final_main_weight must be in \(0, 1\], got 1.5"),
        (dict(temp_start=0.0), "temp_start must be a finite float > 0, got 0.0"),
        (dict(temp_end=math.nan), "temp_end must be a finite float > 0, got nan"),
        (dict(temp_decay_steps=-5), "temp_decay_steps must be an int >= 0, got -5"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        wrap(**kwargs)


def test_non_callable_losses_and_bad_hook_values_are_refused():
    with pytest.raises(ValueError, match="main_loss must be a loss module or callable"):
        LossWarmupWrapper(Constant(1.0), 3.0)
    wrapper = wrap(warmup_epochs=1)
    with pytest.raises(ValueError, match="epoch must be an int >= 0, got -1"):
        wrapper.on_train_epoch_start(-1)
    assert wrapper.epoch == 0
