"""Each loss declares its options once, in its ``options`` table; everything else derives from it.

Validation, the values ranks agree on, ``extra_repr`` and the disagreement messages all come
from the table, so an option is either declared (and then checked and agreed) or refused.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from imbalanced_losses import (
    PAUCAtBudgetLoss,
    QueuedRankingLoss,
    RecallAtQuantileLoss,
    SigmoidFocalLoss,
    SmoothAPLoss,
    SoftmaxFocalLoss,
    _exchange,
)
from imbalanced_losses.options import BASE_OPTIONS, TEMPERATURE, arguments
from imbalanced_losses.testing._example_loss import TopQuantileHingeLoss

ROOT = Path(__file__).resolve().parent.parent
RANKING_LOSSES = [RecallAtQuantileLoss, SmoothAPLoss, PAUCAtBudgetLoss, TopQuantileHingeLoss]
LOSSES = [*RANKING_LOSSES, SigmoidFocalLoss, SoftmaxFocalLoss]


def undeclared_options(cls: type) -> list[str]:
    """Constructor parameters of ``cls`` that its options table does not declare."""
    declared = {option.name for option in cls.options}
    return [
        name
        for name, p in inspect.signature(cls).parameters.items()
        if p.kind is not inspect.Parameter.VAR_KEYWORD and name not in declared
    ]


@pytest.mark.parametrize("cls", LOSSES, ids=lambda c: c.__name__)
def test_every_constructor_option_of_every_loss_is_declared_in_its_options_table(cls):
    assert undeclared_options(cls) == []
    parameters = inspect.signature(cls).parameters
    for option in cls.options:
        if option.name in parameters:  # the signature's default is the table's, if it has one
            default = parameters[option.name].default
            if option.default is not inspect.Parameter.empty:
                assert default == option.default, option.name
        else:  # an option the constructor does not name must have a default
            assert option.default is not inspect.Parameter.empty, option.name


class ForgetfulLoss(QueuedRankingLoss):
    """A planted bug: a new constructor option that the options table does not declare."""

    options = (*BASE_OPTIONS, TEMPERATURE)

    def __init__(self, num_classes: int, temperature: float = 0.1, new_option: float = 1.0):
        super().__init__(**arguments(locals()))


def test_a_constructor_option_the_table_forgets_is_caught_by_the_walk_and_at_construction():
    assert undeclared_options(ForgetfulLoss) == ["new_option"]
    with pytest.raises(TypeError, match=r"\['new_option'\].*options table"):
        ForgetfulLoss(2)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"reduction": "average"}, "reduction"),
        ({"queue_size": -1}, "queue_size"),
        ({"max_pool_size": 0}, "max_pool_size"),
        ({"seed": 1.5}, "seed"),
        ({"temperature": float("inf")}, "temperature"),
        ({"gather_distributed": "yes"}, "gather_distributed"),
        ({"positives": "queue"}, "positives"),
    ],
)
def test_bad_option_values_raise_naming_the_option_and_the_value(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be .*got {re.escape(repr(kwargs[name]))}"):
        RecallAtQuantileLoss(2, **kwargs)


def _disagreement(a, b) -> str:
    """The message two ranks holding losses ``a`` and ``b`` raise (rows built as each rank does)."""
    agreed = [[o.agreed(getattr(x, o.name)) for o in x.options if o.agree] for x in (a, b)]
    rows = [_exchange.columns(row, torch.device("cpu")).tolist() for row in agreed]
    with pytest.raises(ValueError) as error:
        _exchange.raise_on_disagreement(rows, 0, agreed[0])
    return str(error.value)


def test_disagreement_messages_show_option_values_not_codes():
    message = _disagreement(
        RecallAtQuantileLoss(2, reduction="mean", quantile_interpolation="linear"),
        RecallAtQuantileLoss(2, reduction="none", max_pool_size=64),
    )
    assert "reduction (rank 0: 'mean', rank 1: 'none')" in message
    assert "quantile_interpolation (rank 0: 'linear', rank 1: 'higher')" in message
    assert "max_pool_size (rank 0: None, rank 1: 64)" in message


def test_the_focal_losses_agree_on_their_table_options_with_readable_messages():
    message = _disagreement(SoftmaxFocalLoss(reduction="mean"), SoftmaxFocalLoss(reduction="sum"))
    assert message.startswith("ranks disagree on reduction (rank 0: 'mean', rank 1: 'sum')")
    message = _disagreement(SigmoidFocalLoss(alpha=0.25), SigmoidFocalLoss(alpha=-1))
    assert message.startswith("ranks disagree on alpha (rank 0: 0.25, rank 1: -1)")


def test_an_options_own_option_takes_part_in_the_agreement():
    message = _disagreement(
        TopQuantileHingeLoss(2, margin=0.1), TopQuantileHingeLoss(2, margin=0.5)
    )
    assert message.startswith("ranks disagree on margin (rank 0: 0.1, rank 1: 0.5)")


@pytest.mark.parametrize("cls", LOSSES, ids=lambda c: c.__name__)
def test_the_repr_shows_every_option_but_the_process_group(cls):
    text = repr(cls(3, queue_size=4) if cls in RANKING_LOSSES else cls())
    for option in cls.options:
        assert (f"{option.name}=" in text) == (option.name != "process_group"), option.name


def test_the_docs_example_loss_is_the_shipped_example_loss_verbatim():
    page = (ROOT / "docs" / "ddp.md").read_text()
    source = inspect.getsource(TopQuantileHingeLoss)
    assert source in page
