"""Model source: a local directory in the Hugging Face layout, or a Hub repo id fetched with huggingface_hub."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from common.errors import ModelNotFoundError
from common.model.integrity import verify_download

log = logging.getLogger(__name__)

DEFAULT_REPO = "deepseek-ai/DeepSeek-OCR"
# The revision to fetch when none is given. Pin a commit here (or pass --revision) for reproducible installs.
DEFAULT_REVISION = "main"
# Only what dsocr reads: config, tokenizer, weights. The remote-code .py files and assets are skipped.
ALLOW_PATTERNS = ["*.json", "*.safetensors"]


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: shards listed by the index, else the single file(s)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        import json

        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise ModelNotFoundError(f"{index}: not a valid safetensors index (no 'weight_map')") from None
        shards = sorted({model_dir / name for name in weight_map.values()})
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise ModelNotFoundError(f"{model_dir}: shards listed in the index are missing: {', '.join(missing)}")
        return shards
    return sorted(model_dir.glob("*.safetensors"))


def check_model_dir(model_dir: Path) -> Path:
    """A clear error unless the directory holds config.json, tokenizer.json and safetensors weights."""
    if not model_dir.exists():
        raise ModelNotFoundError(f"model directory not found: {model_dir}")
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"--model must be a directory or a Hugging Face repo id, got file {model_dir}")
    missing = [name for name in ("config.json", "tokenizer.json") if not (model_dir / name).is_file()]
    if missing:
        raise ModelNotFoundError(f"{model_dir} is not a DeepSeek-OCR model directory: missing {', '.join(missing)}")
    if not weight_files(model_dir):
        raise ModelNotFoundError(f"{model_dir} has no weights (*.safetensors or model.safetensors.index.json)")
    return model_dir


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and os.sep not in name.replace("/", "")


def _offline_from_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_model(
    model: str | os.PathLike[str] | None = None,
    *,
    revision: str | None = None,
    offline: bool = False,
    show_progress: bool = True,
    verify: bool = True,
) -> Path:
    """Returns a local model directory, downloading from the Hub on first use.

    `model` is a local directory or a repo id (default `deepseek-ai/DeepSeek-OCR`). Honours HF_HOME and
    HF_HUB_OFFLINE. Only config, tokenizer and safetensors files are fetched. A Hub snapshot's files are checked
    against the Hub's hashes once (`verify`; common.model.integrity).
    """
    name = str(model) if model is not None else DEFAULT_REPO
    path = Path(name).expanduser()
    if path.exists() or not _looks_like_repo_id(name):
        return check_model_dir(path)

    offline = offline or _offline_from_env()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kwargs: dict = {"revision": revision or DEFAULT_REVISION, "allow_patterns": ALLOW_PATTERNS}
    if show_progress:
        try:
            from tqdm.rich import tqdm as rich_tqdm

            kwargs["tqdm_class"] = rich_tqdm
        except ImportError:  # plain tqdm bars from huggingface_hub
            pass
    try:
        local = snapshot_download(name, local_files_only=offline, **kwargs)
    except LocalEntryNotFoundError:
        if offline:
            raise ModelNotFoundError(
                f"{name} is not in the Hugging Face cache ({_cache_dir()}) and offline mode is on: "
                f"run once with network access (without --offline / HF_HUB_OFFLINE) to download it, "
                f"or pass --model DIR with a downloaded copy"
            ) from None
        raise ModelNotFoundError(
            f"cannot download {name}: the Hugging Face Hub is unreachable and the model is not cached; "
            f"check your connection or pass --model DIR"
        ) from None
    except GatedRepoError:
        raise ModelNotFoundError(f"{name} is gated: log in with `hf auth login` and accept its terms") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"no such model on the Hugging Face Hub: {name}") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{name} has no revision {kwargs['revision']!r}") from None
    except OSError as exc:  # network errors, disk full, permissions
        raise ModelNotFoundError(f"cannot download {name}: {exc}") from None
    model_dir = check_model_dir(Path(local))
    if verify:
        verify_download(model_dir, offline=offline, show_progress=show_progress)
    return model_dir


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
