"""Batch-size schedules: ABS/ABSA (:class:`AdaptiveBatchSize` with :class:`FGSM`), FB/BL
(:class:`FixedBatchSize`) and GG (:class:`IncreaseBatchSize`), sharing one sampler and one
micro-batched backward (:class:`~curvopt.schedule.base.BatchSizeSchedule`)."""

from curvopt.schedule.adaptive import AdaptiveBatchSize
from curvopt.schedule.base import BatchSizeSchedule
from curvopt.schedule.fgsm import FGSM
from curvopt.schedule.fixed import FixedBatchSize
from curvopt.schedule.increase import IncreaseBatchSize
from curvopt.schedule.registry import available_schedules, make_schedule

__all__ = [
    "AdaptiveBatchSize",
    "BatchSizeSchedule",
    "FGSM",
    "FixedBatchSize",
    "IncreaseBatchSize",
    "available_schedules",
    "make_schedule",
]
