"""Build time only (torch, onnx, onnx2tf): export, quantize and convert backbones. Never imported on a device."""
