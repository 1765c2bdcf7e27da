"""The MLX backend: the Backend protocol over one dedicated generation thread.

MLX streams (and the default device) are thread-local, so every MLX call (loading, vision, prefill,
decode) runs on the thread this backend owns. `generate()` may be called from any thread: it queues the
request and yields the ids the generation thread sends back. Requests run one at a time, in order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from common.backend import PreparedInputs, ProgressCallback
from common.errors import BackendUnavailableError
from common.sampling import SamplingParams

_DONE = object()
_STOP = object()


class MlxBackend:
    name = "mlx"

    def __init__(self, model_dir: Path, device: str, dtype: str, progress: ProgressCallback | None) -> None:
        self.device = device
        self.model_dir = model_dir
        self._requests: queue.Queue[Any] = queue.Queue()
        self._closed = False
        loaded: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(
            target=self._run, args=(dtype, progress, loaded), name="dsocr-mlx-generation", daemon=True
        )
        self._thread.start()
        result = loaded.get()
        if isinstance(result, BaseException):
            self._thread.join()
            raise result
        self.compute_dtype, quantization = result
        self.dtype = f"q{quantization['bits']}" if quantization else self.compute_dtype
        self.eos_token_id = self._model.config.language.eos_token_id

    # ---- generation thread ---------------------------------------------------------------------------

    def _run(self, dtype: str, progress: ProgressCallback | None, loaded: queue.Queue[Any]) -> None:
        try:
            import mlx.core as mx

            from dsocr_mlx.loader import load_model

            mx.set_default_device(mx.gpu if self.device == "metal" else mx.cpu)
            if dtype == "auto":
                # CPU: MLX's CPU kernels are float32-first (gather_mm is float32 only).
                dtype = "bfloat16" if self.device == "metal" else "float32"
            self._model, quantization = load_model(self.model_dir, dtype, progress)
        except BaseException as exc:  # handed to the constructor, which re-raises it on the caller's thread
            loaded.put(exc)
            return
        loaded.put((dtype, quantization))
        self._serve()

    def _serve(self) -> None:
        from dsocr_mlx.generate import generate_tokens

        while True:
            request = self._requests.get()
            if request is _STOP:
                return
            inputs, params, out, cancelled = request
            if cancelled.is_set():
                continue
            try:
                tokens = generate_tokens(self._model, inputs, params, self.eos_token_id)
                try:
                    for token_id in tokens:
                        if cancelled.is_set():
                            break
                        out.put(token_id)
                finally:
                    tokens.close()
                out.put(_DONE)
            except BaseException as exc:  # the caller sees the error where it iterates
                out.put(exc)

    # ---- Backend protocol ------------------------------------------------------------------------------

    def generate(self, inputs: PreparedInputs, params: SamplingParams) -> Iterator[int]:
        if self._closed:
            raise BackendUnavailableError("the mlx backend was closed; load the model again")
        out: queue.Queue[Any] = queue.Queue()
        cancelled = threading.Event()
        self._requests.put((inputs, params, out, cancelled))
        return _stream(out, cancelled.set)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._requests.put(_STOP)
            if threading.current_thread() is not self._thread:
                self._thread.join()
            self._model = None


def _stream(out: queue.Queue[Any], cancel: Callable[[], None]) -> Iterator[int]:
    """The caller's side of one request; closing it (or leaving the loop) cancels the request."""
    try:
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel()


def load(
    model_dir: Path, *, device: str = "cpu", dtype: str = "auto", progress: ProgressCallback | None = None
) -> MlxBackend:
    """Loads the model on MLX; `device` is "metal" (Apple GPU) or "cpu" (MLX's CPU backend)."""
    import mlx.core as mx

    if device == "auto":
        device = "metal" if mx.metal.is_available() else "cpu"
    if device not in ("metal", "cpu"):
        raise BackendUnavailableError(f"the mlx backend runs on metal or cpu, not {device!r}")
    if device == "metal" and not mx.metal.is_available():
        raise BackendUnavailableError(
            "--device metal: no Metal GPU is available to MLX here; use --device cpu"
        )
    return MlxBackend(Path(model_dir), device, dtype, progress)
