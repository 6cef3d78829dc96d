"""Faster decoding past the fp32 roofline: weight-only quantization (:mod:`gptlab.quant.quantize`)."""
