"""The load's work on the CPU: copies (converting, transposing, quantizing), packing and page touches of weights,
run in file order on a thread per core, with the progress they make."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from dsocr_torch.language import Linear
from dsocr_torch.weight_only import quantize_int8
from dsocr_torch.weights.checkpoint import MappedFiles, TensorEntry, map_in
from dsocr_torch.weights.onednn import pack_linear_weight, packed_memory

ProgressCallback = Callable[[str, int, int], None]
PROGRESS_LABEL = "weights (MiB)"  # progress counts the MiB that need copying, converting or packing


def pack_from_checkpoint(files: MappedFiles, entry: TensorEntry, linear: Linear, dtype: torch.dtype) -> None:
    linear.use_packed(pack_linear_weight(files.view(entry).to(dtype)))
    files.release(entry)  # only the packed copy is used from now on


class Progress:
    """Reports the MiB done of the load's work (copies, conversions, packing, mapping pages in)."""

    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def finish(self) -> None:
        """The bar at its end, whatever the estimate was (a cache that could not be written does less work)."""
        if self.callback is not None:
            self.callback(PROGRESS_LABEL, self.done >> 20, self.done >> 20)

    def advance(self, nbytes: int) -> None:
        before, self.done = self.done >> 20, self.done + nbytes
        if self.callback is not None and (self.done >> 20 != before or self.done >= self.total):
            self.callback(PROGRESS_LABEL, self.done >> 20, self.total >> 20)


class Jobs:
    """Copies, packs and page touches of weights, run in file order on a thread per core."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.items: list[tuple[tuple[str, int], int, Callable[[], None]]] = []

    def copy(
        self, files: MappedFiles, entry: TensorEntry, target: torch.Tensor, scales: torch.Tensor | None = None
    ) -> None:
        """The checkpoint tensor into `target`: converted to its dtype (int8: quantized, its per-channel scales
        into `scales`) and, into an expert slot, transposed."""

        def run() -> None:
            if target.dtype == torch.int8:
                assert scales is not None
                quantized, found = quantize_int8(files.view(entry))
                target.copy_(quantized)
                scales.copy_(found)
            else:
                target.copy_(files.view(entry))
            files.release(entry)

        self.items.append(((str(entry.file), entry.begin), entry.nbytes, run))

    def pack(self, files: MappedFiles, entry: TensorEntry, linear: Linear, dtype: torch.dtype) -> None:
        run = functools.partial(pack_from_checkpoint, files, entry, linear, dtype)
        self.items.append(((str(entry.file), entry.begin), entry.nbytes, run))

    def copy_packed(self, linear: Linear, target: torch.Tensor, nbytes: int) -> None:
        """The packed weight's bytes into the cache file (counted as `nbytes` of progress)."""

        def run() -> None:
            assert linear.packed is not None
            target.copy_(packed_memory(linear.packed))

        self.items.append((("~packed", target.data_ptr()), nbytes, run))

    def map_in(self, tensors: Iterable[torch.Tensor]) -> None:
        """Maps memory-mapped weights in now rather than one page fault at a time in a request."""
        for tensor in tensors:
            if tensor.numel():
                order = (f"~{tensor.data_ptr()}", 0)  # after the file work, in address order
                self.items.append((order, tensor.nbytes, functools.partial(map_in, tensor)))

    def run(self) -> None:
        items, self.items = sorted(self.items, key=lambda item: item[0]), []
        if not items:
            return
        threads = torch.get_num_threads()
        # One job per thread, each single-threaded: torch's own parallel copies would make every job wait for
        # all threads at each step, which a busy machine turns into long stalls.
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                futures = [pool.submit(run) for _, _, run in items]
                try:
                    for (_, nbytes, _), future in zip(items, futures, strict=True):
                        future.result()
                        self.progress.advance(nbytes)
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
        finally:
            torch.set_num_threads(threads)
