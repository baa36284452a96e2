"""TorchServe's gRPC inference contract (inference.proto) and the Python code generated from it."""
