"""Backends: the frameworks a model comes from (torchvision, timm, ONNX)."""
