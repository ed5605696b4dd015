"""INT8 quantization: placement, calibration, learnable quantizers, sensitivity."""
