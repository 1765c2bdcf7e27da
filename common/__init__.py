"""Framework-free core of dsocr, shared by both front ends (cli.py, server.py) and both backends.

Sub-packages, lowest layer first; a package imports only from the ones before it:

- the root modules `errors`, `files`, `logs`, `memory`: small utilities every layer may use;
- `model`: what a model is (config.json, families and modes, tokenizer, prompt and views, Hub download, device);
- `engine`: running a loaded model (the backend interface, the engine core that owns it, scheduling, sampling,
  output processing, constraints);
- `documents`: documents in, Markdown out (opening documents, work items, post-processing, outputs, batches,
  Ray);
- `serve`: the OpenAI-compatible HTTP API (schema, streaming, chat folding, media, limits, admission, metrics);
- `options`: what users choose, as flags and DSOCR_* variables, for the CLI and the server alike.

Nothing in this package imports torch or mlx (tests/test_common_layers.py checks it, and the layering).
"""
