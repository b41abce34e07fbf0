"""Hessian-aware mixed-precision quantization (HAWQ): quantizers, ``fake_quantized``,
sensitivity scores, bit allocation (ILP / Pareto) and quantization-aware fine-tuning.

Pipeline::

    report = curvopt.sensitivity(model, calibration)                 # bit-independent, score="hawq_v2"
    plan = curvopt.allocate_bits(model, report, average_bits=3.0)    # HAWQ-V3's integer program
    with curvopt.fake_quantized(model, plan):                        # weights restored bit for bit on exit
        accuracy = evaluate(model)
    curvopt.quant.finetune(model, plan, train_loader, epochs=1)     # optional STE fine-tuning
"""

from curvopt.quant.allocate import ALLOCATORS, METHODS, allocate_bits
from curvopt.quant.baselines import random_plans, uniform_plan
from curvopt.quant.fake import fake_quantized
from curvopt.quant.finetune import finetune
from curvopt.quant.plan import BitPlan, ParetoPoint, check_bits, plan_bits, quantizable_modules
from curvopt.quant.quantizer import CLIPPINGS, QUANTIZER_NAMES, Quantizer, make_quantizer
from curvopt.quant.scores import SCORE_NAMES, SCORES, Score

__all__ = [
    "ALLOCATORS",
    "CLIPPINGS",
    "METHODS",
    "QUANTIZER_NAMES",
    "SCORES",
    "SCORE_NAMES",
    "BitPlan",
    "ParetoPoint",
    "Quantizer",
    "Score",
    "allocate_bits",
    "check_bits",
    "fake_quantized",
    "finetune",
    "make_quantizer",
    "plan_bits",
    "quantizable_modules",
    "random_plans",
    "uniform_plan",
]
