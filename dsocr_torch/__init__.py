"""PyTorch backend for DeepSeek-OCR (CPU and CUDA)."""
