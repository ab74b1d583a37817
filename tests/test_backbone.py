"""Backbone checks: a backbone that cannot serve the params stops before any work, with one message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from dynaflow.config import ConfigError, Params
from dynaflow.models.backbone import SUPPORTED_MODEL_TYPES, check_backbone, check_grid

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def error_for(backbone: str | Path, **params: Any) -> str:
    with pytest.raises(ConfigError) as info:
        check_backbone(Params(backbone=str(backbone), **params))
    msg = str(info.value)
    assert msg.startswith(f"backbone = {str(backbone)!r}: "), msg
    return msg


def copy_backbone(src: Path, dst: Path, **config: Any) -> Path:
    """A copy of ``src`` whose config.json has ``config`` merged in (weights left out: never read)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix in (".json", ".txt"):
            shutil.copy(f, dst / f.name)
    raw = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(raw | config))
    return dst


def copy_tokenizer(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    return dst


def test_tiny_and_default_backbones_pass(tiny_backbone: Path) -> None:
    check_backbone(Params(backbone=str(tiny_backbone), data={"max_seq_length": 64}))
    check_backbone(Params())  # 'default': the packaged MiniLM-L6-H384
    check_grid(Params(backbone=str(tiny_backbone)))


def test_relative_directory_is_not_taken_for_a_hub_id(
    tmp_path: Path, tiny_backbone: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_backbone(tiny_backbone, tmp_path / "my-bert")
    copy_tokenizer(tiny_backbone, tmp_path / "my-tokenizer")
    monkeypatch.chdir(tmp_path)
    check_backbone(Params(backbone="my-bert"))  # a valid hub id too, but the directory exists
    assert "my-tokenizer has no config.json; a Hugging Face model directory" in error_for("my-tokenizer")


@pytest.mark.parametrize("value", ["/no/such/backbone", "./no-such-backbone", "~/no-such-backbone", "a/b/c"])
def test_missing_directory(value: str) -> None:
    msg = error_for(value)
    assert "no such directory" in msg and "'default'" in msg
    assert "Repo id" not in msg  # not huggingface_hub's complaint about the hub id form


def test_file_instead_of_directory(tmp_path: Path) -> None:
    file = tmp_path / "model.bin"
    file.write_bytes(b"")
    assert "not a directory" in error_for(file)


def test_hub_id_not_cached_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for value in ("bert-base-uncased", "some-org/some-bert"):
        msg = error_for(value)
        assert "HF_HUB_OFFLINE=1" in msg and "cache" in msg and "local BERT directory" in msg, msg
        assert "'default'" in msg


def test_hub_id_in_local_cache_passes(
    tmp_path: Path, tiny_backbone: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    sha = "0" * 40
    copy_backbone(tiny_backbone, cache / "models--some-org--tiny-bert" / "snapshots" / sha)
    (cache / "models--some-org--tiny-bert" / "refs").mkdir()
    (cache / "models--some-org--tiny-bert" / "refs" / "main").write_text(sha)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    check_backbone(Params(backbone="some-org/tiny-bert", data={"max_seq_length": 32}))


def test_directory_without_config(tmp_path: Path, tiny_backbone: Path) -> None:
    path = copy_tokenizer(tiny_backbone, tmp_path / "no-config")
    msg = error_for(path)
    assert "no config.json" in msg and "save_pretrained" in msg


def test_config_not_json(tmp_path: Path, tiny_backbone: Path) -> None:
    path = copy_backbone(tiny_backbone, tmp_path / "broken")
    (path / "config.json").write_text("{not json")
    assert "not readable JSON" in error_for(path)


def test_gpt2_directory_names_model_type_and_supported(tmp_path: Path, tiny_backbone: Path) -> None:
    from transformers import GPT2Config

    path = copy_tokenizer(tiny_backbone, tmp_path / "gpt2")
    GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=40, n_positions=64).save_pretrained(path)
    # widths as in the issue: the check must fire before anything tries the grid on a GPT-2.
    msg = error_for(path, widths=[1.0, 0.5])
    assert "model_type 'gpt2'" in msg, msg
    assert all(t in msg for t in SUPPORTED_MODEL_TYPES), msg
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        check_grid(Params(backbone=str(path)))


@pytest.mark.parametrize("model_type", ["roberta", "distilbert", None])
def test_other_model_types_rejected(tmp_path: Path, tiny_backbone: Path, model_type: str | None) -> None:
    path = copy_backbone(tiny_backbone, tmp_path / "other", model_type=model_type)
    msg = error_for(path)
    assert (f"model_type {model_type!r}" if model_type else "no model_type") in msg, msg


def test_relative_positions_rejected(tmp_path: Path, tiny_backbone: Path) -> None:
    path = copy_backbone(tiny_backbone, tmp_path / "relative", position_embedding_type="relative_key")
    assert "position_embedding_type 'relative_key'" in error_for(path)


@pytest.mark.parametrize(
    ("tokenizer_config", "fragment"),
    [
        (None, "only unknown tokens"),  # transformers 5 builds a BERT tokenizer of special tokens only
        ({"tokenizer_class": "GPT2Tokenizer"}, "no tokens"),  # the zero-length sequences
    ],
)
def test_directory_without_tokenizer_files(
    tmp_path: Path, tiny_backbone: Path, tokenizer_config: dict | None, fragment: str
) -> None:
    path = tmp_path / "no-tokenizer"
    path.mkdir()
    shutil.copy(tiny_backbone / "config.json", path / "config.json")
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    msg = error_for(path)
    assert f"gives {fragment} for 'a quick test sentence'" in msg and "save_pretrained" in msg, msg


def test_tokenizer_outside_vocabulary(tmp_path: Path, tiny_backbone: Path) -> None:
    path = copy_backbone(tiny_backbone, tmp_path / "small-vocab", vocab_size=3)
    assert "vocab_size is 3" in error_for(path)


def test_max_seq_length_above_max_position_embeddings(tiny_backbone: Path) -> None:
    msg = error_for(tiny_backbone, data={"max_seq_length": 100})
    assert "data.max_seq_length = 100" in msg and "max_position_embeddings = 64" in msg, msg


def test_profile_seq_len_above_max_position_embeddings(tiny_backbone: Path) -> None:
    profiles = [{"name": "long", "seq_len": 128}, {"name": "short", "seq_len": 16}]
    msg = error_for(tiny_backbone, data={"max_seq_length": 16}, evaluate={"profiles": profiles})
    assert "evaluate.profiles 'long': seq_len = 128" in msg and "'short'" not in msg, msg


def test_no_room_for_text(tiny_backbone: Path) -> None:
    msg = error_for(tiny_backbone, data={"task": "mrpc", "max_seq_length": 3})
    assert "no room for text" in msg


def test_problems_reported_together(tiny_backbone: Path) -> None:
    msg = error_for(
        tiny_backbone,
        widths=[1.0, 0.1],
        depths=[1.0, 0.1],
        data={"max_seq_length": 100},
        evaluate={"profiles": [{"name": "long", "seq_len": 128}]},
    )
    assert "4 problems" in msg, msg
    assert "widths: 0.1:" in msg and "0 of 4 attention heads" in msg
    assert "depths: 0.1:" in msg and "0 of 2 layers" in msg
    assert "data.max_seq_length = 100" in msg and "'long'" in msg


def test_check_grid_only_checks_grid(tiny_backbone: Path) -> None:
    with pytest.raises(ConfigError, match=r"widths: 0.1: .*0 of 4 attention heads"):
        check_grid(Params(backbone=str(tiny_backbone), widths=[1.0, 0.1]))
    check_grid(Params(backbone=str(tiny_backbone), data={"max_seq_length": 100}))
