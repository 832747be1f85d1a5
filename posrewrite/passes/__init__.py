"""Graph passes: ONNX (`passes.onnx`) and torch.export/fx (`passes.fx`)."""
