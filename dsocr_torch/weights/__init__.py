"""Torch weight loading: from a model directory's safetensors to a DeepseekOCRForCausalLM ready to run.

`loader` builds the model on the meta device, checks every name and shape against the checkpoint and fills it;
`checkpoint` reads safetensors files (one, or an index and shards) through memory maps; `prepared` keeps the
tensors whose layout is not the checkpoint's (stacked experts, converted dtypes, packed weights) in a cache file
beside the model; `onednn` packs bfloat16 weights into oneDNN's layout and maps packed weights from that file;
`jobs` runs the copies, conversions and packing on a thread per core; `stored` plans the weight-only slots of
`--quantize` and prepares its kernels.
The model itself (dsocr_torch.model) knows nothing of files.
"""
