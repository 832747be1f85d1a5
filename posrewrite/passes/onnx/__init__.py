"""ONNX passes over onnx_ir models: detection, rescaling, precision, fusion, cleanup."""
