"""Hypothesis profiles: ``ci`` (default, keeps the suite within minutes on two cores)
and ``thorough`` (select with ``HYPOTHESIS_PROFILE=thorough``)."""

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# One thread: the suite's products are tiny, and on a shared 2-core machine two threads' spin-waits
# made them up to 100x slower (a tutorial took 277 s under pytest, 17 s alone).
torch.set_num_threads(1)
