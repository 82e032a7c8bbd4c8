"""Writers for sparse formats other tools read: CSR, compressed-tensors, ONNX."""
