"""MLX backend for DeepSeek-OCR: SAM + CLIP vision encoders, projector and the DeepSeek-V2 MoE decoder.

Runs on Apple Silicon (Metal, unified memory) and, more slowly, on Linux CPU through `mlx[cpu]`.
Convolutions are channels-last (NHWC activations, OHWI weights); each model file's `sanitize` converts
the official PyTorch checkpoint tensors.
"""
