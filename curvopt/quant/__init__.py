"""Hessian-aware mixed-precision quantization (HAWQ): quantizers, ``fake_quantized``,
sensitivity scores, bit allocation (ILP / Pareto) and quantization-aware fine-tuning."""

from curvopt.quant.fake import fake_quantized
from curvopt.quant.plan import check_bits, plan_bits, quantizable_modules
from curvopt.quant.quantizer import Quantizer

__all__ = ["Quantizer", "check_bits", "fake_quantized", "plan_bits", "quantizable_modules"]
