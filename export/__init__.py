"""torch -> ONNX export of the EMA generator, with numerical verification against PyTorch."""
