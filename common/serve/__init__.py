"""The OpenAI-compatible HTTP API, framework-free: wire schema, streaming replies, chat folding, request media
and their fetching, request limits, admission into the engine, metrics, and errors as the API answers them."""
