"""Fidelity checks shared by ``verify``, ``onnx`` and ``bench``: loading models for comparison,
calibration inputs, and the comparison of two models' outputs on non-pad positions."""
