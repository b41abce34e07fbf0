"""Schedules by name (the CLI's ``[schedule] name``)."""

import pytest
import torch
from torch import nn

from curvopt.errors import OptionError
from curvopt.schedule import (
    AdaptiveBatchSize,
    FixedBatchSize,
    IncreaseBatchSize,
    available_schedules,
    make_schedule,
)


def _args():
    model = nn.Linear(3, 2)
    return torch.optim.SGD(model.parameters(), lr=0.1), model, nn.CrossEntropyLoss(), (
        torch.randn(64, 3), torch.randint(0, 2, (64,)))


def test_each_name_builds_its_schedule():
    assert available_schedules() == ("none", "fb", "gg", "abs", "absa")
    bl = make_schedule("none", *_args(), batch_size=4)
    assert isinstance(bl, FixedBatchSize) and bl.batch_size == bl.base_batch_size == 4
    fb = make_schedule("fb", *_args(), batch_size=4, max_batch_size=16, warmup_epochs=1)
    assert isinstance(fb, FixedBatchSize) and (fb.batch_size, fb.base_batch_size, fb.warmup_epochs) == (16, 4, 1)
    gg = make_schedule("gg", *_args(), batch_size=4, max_batch_size=16, milestones=[2])
    assert isinstance(gg, IncreaseBatchSize) and gg.milestones == [2]
    ab = make_schedule("abs", *_args(), batch_size=4, max_batch_size=16, kappa=3)
    assert isinstance(ab, AdaptiveBatchSize) and ab.kappa == 3 and ab.adversarial is None
    absa = make_schedule("absa", *_args(), batch_size=4, max_batch_size=16, eps=0.1, fraction=0.3)
    assert absa.adversarial.eps == 0.1 and absa.adversarial.fraction == 0.3


def test_bad_names_and_options():
    with pytest.raises(OptionError, match="unknown schedule 'adaptive'; valid names: none, fb, gg, abs, absa"):
        make_schedule("adaptive", *_args(), batch_size=4)
    with pytest.raises(OptionError, match="'absa' needs the FGSM step"):
        make_schedule("absa", *_args(), batch_size=4, max_batch_size=8)
    with pytest.raises(OptionError, match="'abs' needs max_batch_size"):
        make_schedule("abs", *_args(), batch_size=4)
    with pytest.raises(OptionError, match="'none' keeps batch_size=4"):
        make_schedule("none", *_args(), batch_size=4, max_batch_size=8)
