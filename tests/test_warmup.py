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
    # Left alone (1.0) during the warm-up, as the reference does; then
    # 0.1 * 0.01 ** (k / 4) for k = 0 .. 4 steps after the warm-up, then 0.001.
    after = [0.1, 0.1 * 0.01**0.25, 0.01, 0.1 * 0.01**0.75, 0.001, 0.001, 0.001]
    assert temperatures == pytest.approx([1.0, 1.0, 1.0] + after, rel=1e-12)


def test_temperature_decay_counts_steps_in_an_epoch_schedule_too():
    wrapper = wrap(warmup_epochs=1, temp_start=1.0, temp_end=0.25, temp_decay_steps=2)
    blended(wrapper)
    wrapper.on_train_epoch_start(1)
    temps = []
    for _ in range(3):
        blended(wrapper)
        temps.append(wrapper.current_temperature)  # what that forward used
    assert temps == pytest.approx([1.0, 0.5, 0.25], rel=1e-12)


def test_properties_describe_the_step_just_taken_as_in_the_reference():
    # Steps, W=5, B=3: a forward's loss is 10 + 10 w (warm-up 10, main 20), and main_weight
    # read after it must be that w, with or without the batch hook.
    for hooks in (True, False):
        wrapper = wrap(warmup_steps=5, blend_steps=3)
        for step in range(10):
            if hooks:
                wrapper.on_train_batch_start(step)
            value = blended(wrapper)
            assert value == pytest.approx(10 + 10 * wrapper.main_weight, abs=1e-12), step
            assert wrapper.in_warmup == (step < 5) and wrapper.in_blend == (5 <= step < 8)


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
    assert wrapper.in_warmup  # the step just taken was the last warm-up step
    wrapper(torch.randn(6, 1, dtype=torch.float64), torch.tensor([0, 1, 0, 0, 1, 0]))
    assert wrapper.main_weight == 1.0 and main.queue.count == 16  # the switch kept the queue


def test_eval_forwards_never_advance_the_schedule_nor_fill_the_queue():
    main = RecallAtQuantileLoss(1, quantile=0.2, queue_size=16).double()
    wrapper = LossWarmupWrapper(
        Constant(1.0), main, warmup_steps=1, blend_steps=2, temp_decay_steps=5
    )
    x, y = torch.randn(4, 1, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    wrapper(x, y)
    wrapper(x, y)  # step 1: the first blend step, w = 1/3
    before = (wrapper.main_weight, wrapper.in_blend, wrapper.current_temperature)
    state = wrapper.get_extra_state()
    temperature, count = main.temperature, main.queue.count
    wrapper.eval()
    for _ in range(3):
        wrapper(x, y)
    assert (wrapper.main_weight, wrapper.in_blend, wrapper.current_temperature) == before
    assert wrapper.get_extra_state() == state
    assert main.temperature == temperature and main.queue.count == count
    wrapper.train()
    wrapper(x, y)  # the next training forward is step 2
    assert wrapper.main_weight == pytest.approx(2 / 3, rel=1e-15)


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
    assert resumed.get_extra_state() == first.get_extra_state()
    # Right after loading, the properties are those of the last forward before saving.
    for name in ("in_warmup", "in_blend", "main_weight", "current_temperature"):
        assert getattr(resumed, name) == getattr(first, name), name
    assert resumed.main_loss.queue.count == first.main_loss.queue.count
    got = [float(resumed(x, y)) for x, y in batches[stop:]]
    assert got == expected[stop:]  # bit for bit: weights, temperatures and queue all resumed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(warmup_epochs=2, warmup_steps=10), "Cannot specify both warmup_epochs"),
        (dict(warmup_steps=1, blend_epochs=1, blend_steps=0), "Cannot specify both blend_epochs"),
        (dict(blend_steps=3), "blend_steps requires warmup_steps"),
        (dict(warmup_steps=3, blend_epochs=1), "counts epochs.*use blend_steps"),
        (dict(warmup_epochs=-1), "warmup_epochs must be >= 0, got -1"),
        (dict(warmup_epochs=1.5), "warmup_epochs must be an int >= 0, got 1.5"),
        (dict(warmup_steps=1, blend_steps=2.5), "blend_steps must be an int >= 0, got 2.5"),
        (dict(final_main_weight=0.0), r"final_main_weight must be in \(0, 1\], got 0.0"),
        (dict(final_main_weight=1.5), r"final_main_weight must be in \(0, 1\], got 1.5"),
        (dict(temp_start=0.0), "temp_start and temp_end must be positive .*temp_start=0.0"),
        (dict(temp_end=math.nan), "temp_start and temp_end must be positive .*temp_end=nan"),
        (dict(temp_decay_steps=0), "temp_decay_steps must be positive, got 0"),
        (dict(temp_decay_steps=-5), "temp_decay_steps must be positive, got -5"),
        (dict(reset_queue_each_epoch=1), "reset_queue_each_epoch must be a bool, got 1"),
        (dict(gather_distributed="yes"), "gather_distributed must be None, True or False"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        wrap(**kwargs)


def test_non_callable_losses_and_bad_hook_values_are_refused():
    with pytest.raises(ValueError, match="main_loss must be a loss module or callable"):
        LossWarmupWrapper(Constant(1.0), 3.0)
    wrapper = wrap(warmup_epochs=1)
    with pytest.raises(ValueError, match="epoch must be >= 0, got -1"):
        wrapper.on_train_epoch_start(-1)
    with pytest.raises(ValueError, match="global_step must be an int >= 0, got 2.0"):
        wrapper.on_train_batch_start(2.0)
    assert wrapper.in_warmup


def test_the_first_four_options_are_positional_as_in_the_reference():
    wrapper = LossWarmupWrapper(Constant(10.0), Constant(20.0), 2, 0.3, 0.03, 7, blend_epochs=1)
    assert (wrapper.warmup_epochs, wrapper.temp_start, wrapper.temp_end) == (2, 0.3, 0.03)
    assert wrapper.temp_decay_steps == 7 and wrapper.blend_epochs == 1


class QueuedStub(nn.Module):
    """A main loss with a queue of the rows it saw (``reset_queue`` empties it)."""

    def __init__(self, queue_size: int = 8) -> None:
        super().__init__()
        self.queue_size, self.temperature, self.rows = queue_size, 1.0, 0
        self.gather_distributed = None

    def forward(self, logits, targets, *extra, **kwargs):
        if self.training:
            self.rows += logits.shape[0]
        return logits.sum() * 0.0 + 20.0

    def reset_queue(self) -> None:
        self.rows = 0


def test_reset_queue_each_epoch_empties_the_queue_at_each_epoch_start_after_the_warmup():
    main = QueuedStub()
    wrapper = LossWarmupWrapper(Constant(10.0), main, warmup_epochs=2, reset_queue_each_epoch=True)
    seen = []
    for epoch in range(4):
        wrapper.on_train_epoch_start(epoch)
        seen.append(main.rows)
        blended(wrapper)
        blended(wrapper)
    # Filled during the warm-up (2 rows a forward), kept at the switch... until epoch 2 starts.
    assert seen == [0, 4, 0, 0]
    kept = QueuedStub()
    wrapper = LossWarmupWrapper(Constant(10.0), kept, warmup_epochs=1)
    wrapper.on_train_epoch_start(0)
    blended(wrapper)
    wrapper.on_train_epoch_start(1)
    wrapper.on_train_batch_start(1)
    blended(wrapper)
    assert kept.rows == 4  # without the option, the switch keeps the warm-up's rows


def test_gather_distributed_is_passed_to_the_main_loss_only_when_given():
    main = QueuedStub()
    main.gather_distributed = False
    LossWarmupWrapper(Constant(1.0), main)
    assert main.gather_distributed is False
    LossWarmupWrapper(Constant(1.0), main, gather_distributed=True)
    assert main.gather_distributed is True


def test_the_references_warnings_for_a_main_loss_without_temperature_or_reset_queue():
    with pytest.warns(UserWarning, match="has no 'temperature' attribute"):
        wrapper = LossWarmupWrapper(Constant(1.0), lambda x, y: x.sum())
    assert wrapper.current_temperature is None
    with pytest.warns(UserWarning, match="has no 'reset_queue' method"):
        LossWarmupWrapper(Constant(1.0), Constant(2.0), reset_queue_each_epoch=True)


class WeightedWarmup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def forward(self, logits, targets, *, sample_weight=None):
        self.calls.append({"sample_weight": sample_weight})
        return logits.sum() * 0.0 + 10.0


def test_the_warmup_loss_gets_logits_targets_and_only_a_sample_weight():
    main = RecallAtQuantileLoss(3, quantile=0.3, queue_size=0)
    warm = WeightedWarmup()
    wrapper = LossWarmupWrapper(warm, main, warmup_steps=1, blend_steps=1)
    x, y, w = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]), torch.rand(6)
    out = wrapper(x, y, sample_weight=w, return_per_class=True)  # warm-up: the scalar
    assert out.ndim == 0 and torch.equal(warm.calls[0]["sample_weight"], w)
    loss, per_class, valid = wrapper(x, y, return_per_class=True)  # blend, w = 1/2
    main_loss, main_per_class, _ = main(x, y, return_per_class=True)
    assert loss == pytest.approx(0.5 * 10.0 + 0.5 * float(main_loss), rel=1e-6)
    assert torch.equal(per_class, main_per_class) and warm.calls[1]["sample_weight"] is None
    ce = LossWarmupWrapper(nn.CrossEntropyLoss(), main, warmup_steps=1)
    assert ce(x, y, sample_weight=w, return_per_class=True).ndim == 0


def test_a_version_1_state_resumes_at_the_same_place():
    main = Constant(20.0)
    wrapper = LossWarmupWrapper(
        Constant(10.0), main, warmup_steps=2, blend_steps=3, temp_start=1.0, temp_end=0.1,
        temp_decay_steps=4,
    )  # fmt: skip
    # Version 1 saved the next step (6) and the steps taken since the warm-up (4).
    wrapper.set_extra_state({"epoch": 0, "step": 6, "decay_step": 4})
    assert wrapper.main_weight == 1.0 and not wrapper.in_blend
    assert main.temperature == pytest.approx(1.0 * 0.1 ** (3 / 4), rel=1e-12)
    assert blended(wrapper) == pytest.approx(20.0, abs=1e-12)
    assert main.temperature == pytest.approx(0.1, rel=1e-12)  # step 6: 4 steps after step 2
