"""Shared fixtures: a tiny random BERT backbone, a tiny GLUE directory, and a throw-away project."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification

from dynaflow.models.elastic_bert import ElasticBertForSequenceClassification

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Keep Prefect's database and cached results out of the user's ~/.prefect and away from earlier runs.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="dynaflow-test-prefect-")
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = os.path.join(os.environ["PREFECT_HOME"], "results")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-bf16",
        action="store_true",
        help="run as on hardware without native bf16 (precision: auto resolves to fp32)",
    )


@pytest.fixture(scope="session", autouse=True)
def native_bf16(request: pytest.FixtureRequest) -> Iterator[None]:
    """``--no-bf16``: the suite as a CPU without AVX512-BF16 runs it (training steps in fp32)."""
    from dynaflow.training import precision

    with pytest.MonkeyPatch.context() as mp:
        if request.config.getoption("--no-bf16"):
            mp.setattr(precision, "cpu_has_bf16", lambda: False)
        yield


# A random BERT small enough for exact, fast checks of the model code (3 layers, 4 heads, FFN 48).
TINY_BERT = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=40,
)


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add overhead, and stall badly when other jobs share the CPU.

    Use per module: ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_elastic(seed: int = 0, **overrides: object) -> ElasticBertForSequenceClassification:
    """A random tiny elastic BERT (``TINY_BERT`` with ``overrides``), eval mode.

    Initialised with std 0.2 instead of BERT's 0.02, so that sub-networks and importance scores of the random
    network differ visibly.
    """
    torch.manual_seed(seed)
    cfg = BertConfig(**{**TINY_BERT, **overrides})
    cfg.initializer_range = 0.2
    return ElasticBertForSequenceClassification.from_bert(BertForSequenceClassification(cfg)).eval()


WORDS = (
    "the a an movie film is was good bad great awful fun boring love hate best worst story acting "
    "not very and but it this that of to funny dull charming mess"
).split()


def make_tiny_backbone(path: Path, layers: int = 2, heads: int = 4, hidden: int = 32) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, ".", ","]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # Positional: transformers 5 silently ignores vocab_file= (every word would become [UNK]).
    BertTokenizerFast(str(path / "vocab.txt"), do_lower_case=True).save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=64,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))


def write_sst2(root: Path, n_train: int = 56, n_dev: int = 16) -> Path:
    """A small SST-2 directory in the GLUE layout, with a learnable signal (good/bad words); with
    tiny_params' 8 held-out rows, 48 train."""
    task = root / "SST-2"
    task.mkdir(parents=True, exist_ok=True)
    pos, neg = ["good", "great", "fun", "charming", "best"], ["bad", "awful", "boring", "dull", "worst"]

    def rows(n: int, offset: int) -> str:
        lines = ["sentence\tlabel"]
        for i in range(n):
            label = (i + offset) % 2
            word = (pos if label else neg)[i % 5]
            lines.append(f"the movie was {word} and the story {word} \t{label}")
        return "\n".join(lines) + "\n"

    (task / "train.tsv").write_text(rows(n_train, 0))
    (task / "dev.tsv").write_text(rows(n_dev, 1))
    return root


def poisoned_copy(data_dir: Path, where: Path) -> Path:
    """A copy of a data stage's output whose dev split is the held-out rows with their labels flipped: a
    checkpoint selection that read dev would rank every checkpoint the other way round."""
    import shutil

    from dynaflow.data.splits import load_split, write_split

    shutil.copytree(data_dir, where)
    held = load_split(where, "heldout")
    write_split(where / "dev.parquet", held.input_ids, held.token_type_ids, 1 - held.labels)
    return where


@pytest.fixture
def tiny_glue(tmp_path: Path) -> Path:
    return write_sst2(tmp_path / "glue")


def tiny_params(backbone: Path, glue_dir: Path, **teacher: object) -> dict:
    return {
        "seed": 1,
        "backbone": str(backbone),
        "data": {"task": "sst2", "glue_dir": str(glue_dir), "max_seq_length": 16, "heldout_examples": 8},
        "teacher": {"epochs": 1, "batch_size": 8, "eval_batch_size": 16, "learning_rate": 1e-3, **teacher},
        # Default profiles, few timed calls (tiny model); float32 only: int8 variants add a third to every
        # measurement, and tests/test_evaluate.py (its own evaluate section) covers them.
        "evaluate": {"warmup": 1, "repeats": 3, "int8": False},
        "teacher_gate": {"on_fail": "warn"},  # a tiny teacher may sit at chance: plumbing is tested here
        # ConvBERT students for one epoch: the flows that run every method (compare, dvc repro) stay short.
        # Its groups stay the shipped ones: dvc.yaml declares a loss-curve plot per student.
        "convbert": {"epochs": 1, "kernel_size": 3},
        "gates": {"epochs": 1},  # its lambdas stay the shipped ones, as convbert.groups (plots per λ)
        "adabert": {"hidden_size": 16, "max_cells": 2, "probe_steps": 20},
        "adabert_search": {"epochs": 2, "arch_warmup_epochs": 1, "batch_size": 8},
        "adabert_train": {"epochs": 1, "batch_size": 8, "random_architectures": 2},
    }


@pytest.fixture
def project(tmp_path: Path, tiny_backbone: Path, tiny_glue: Path) -> Path:
    """A project root with a tiny params.yaml (tiny BERT, tiny SST-2)."""
    root = tmp_path / "project"
    root.mkdir()
    from dynaflow.config import Params

    # Every section written out: DVC requires each params key its stages name to be in the file.
    full = Params.model_validate(tiny_params(tiny_backbone, tiny_glue)).model_dump(mode="json")
    (root / "params.yaml").write_text(yaml.safe_dump(full))
    return root


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    path = os.environ.get("GLUE_DIR")
    if not path or not (Path(path) / "SST-2" / "train.tsv").is_file():
        pytest.skip("GLUE_DIR with SST-2 is not set")
    return Path(path)


@pytest.fixture(scope="module")
def this_machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """CUDA reported absent (a gpu profile is skipped on any machine) and one machine identity file for the
    module: measurement stages are keyed on it, so selection sees their outputs as up to date."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def stand_in_training() -> Iterator[None]:
    """Tests that put stand-in outputs (a random model, manifest key "test") where training stages write:
    selection then judges a measurement by its own key alone, not by the (fake) stages it was made from."""
    from stages import registry

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "ancestors", lambda name: [])
        yield
