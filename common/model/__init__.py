"""What a model is, before any tensor exists: config.json as typed config, the model families and their
resolution modes, the tokenizer, prompts and image views (tiling), the inputs a backend receives, where the
weights come from (the Hugging Face Hub) and which device runs them."""
