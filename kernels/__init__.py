"""Fused contrastive-loss kernels (Triton) and their PyTorch twin."""
