"""Deep models: PyTorch runtime, training loop, checkpoints, occlusion influence, data and layers."""
