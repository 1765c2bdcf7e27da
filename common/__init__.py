"""Framework-free core of dsocr: config, preprocessing, tokenization, post-processing, the backend interface.

Nothing in this package imports torch or mlx (tests/test_common_imports.py checks it).
"""
