"""Augment stage and the embedding-neighbour augmentation on the tiny backbone and tiny SST-2."""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from dynaflow.config import AugmentConfig, Params
from dynaflow.core.tracking import NullTracker
from dynaflow.data.augment import (
    Vocabulary,
    augment_split,
    build_neighbours,
    load_vocabulary,
    load_word_embeddings,
    nearest_neighbours,
    replaceable_positions,
)
from dynaflow.data.splits import TOKENIZER_DIR, TokenizedSplit, load_split
from stages import augment, data
from tests.conftest import WORDS, tiny_params

N, M, P = 6, 3, 0.5


@pytest.fixture(scope="module")
def backbone(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny backbone with a tokenizer that knows its vocabulary.

    With transformers 5, ``BertTokenizerFast(vocab_file=...)`` (as in conftest) silently ignores the file
    and tokenises every word as [UNK]; the positional argument works with both 4.x and 5.x.
    """
    from transformers import BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert-vocab") / "bert"
    shutil.copytree(tiny_backbone, path)
    BertTokenizerFast(str(path / "vocab.txt"), do_lower_case=True).save_pretrained(path)
    return path


@pytest.fixture
def dirs(tmp_path: Path, backbone: Path, tiny_glue: Path) -> tuple[Path, Path]:
    """(data stage output, a teacher-like directory whose embeddings carry the ``bert.`` prefix)."""
    params = Params.model_validate(tiny_params(backbone, tiny_glue))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data.prepare(params.data, params.backbone, params.seed, data_dir, NullTracker())
    ids = np.concatenate(load_split(data_dir, "train").input_ids)
    assert np.mean(ids == 1) < 0.1, "the tiny tokenizer maps words to [UNK]"  # nothing to augment then
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    emb = load_file(backbone / "model.safetensors")["embeddings.word_embeddings.weight"]
    save_file({"bert.embeddings.word_embeddings.weight": emb.contiguous()}, teacher_dir / "model.safetensors")
    return data_dir, teacher_dir


def run_stage(dirs: tuple[Path, Path], tmp_path: Path, name: str = "out", seed: int = 1, **cfg: object):
    out = tmp_path / name
    out.mkdir()
    metrics = augment.augment_train(AugmentConfig(**cfg), seed, dirs[1], dirs[0], out, NullTracker())
    return out, metrics


def brute_force_top(emb: np.ndarray, allowed: np.ndarray, word: int, m: int) -> set[int]:
    """Top-m cosine neighbours of one id, computed the slow, obvious way."""
    sims = {
        j: float(emb[word] @ emb[j] / (np.linalg.norm(emb[word]) * np.linalg.norm(emb[j])))
        for j in range(len(emb))
        if allowed[j] and j != word
    }
    return set(sorted(sims, key=sims.get, reverse=True)[:m])


def augment_tiny(dirs: tuple[Path, Path], seed: int = 1, **kw: object):
    data_dir, teacher_dir = dirs
    train = load_split(data_dir, "train")
    emb = load_word_embeddings(teacher_dir)
    vocab = load_vocabulary(data_dir / TOKENIZER_DIR, size=emb.shape[0])
    table = build_neighbours(emb, vocab, train.input_ids, M)
    args = {"n_variants": N, "replace_prob": P, "seed": seed} | kw
    out, source, stats = augment_split(train, vocab, table, **args)  # type: ignore[arg-type]
    return train, emb, vocab, out, source, stats


def assert_same_split(a: TokenizedSplit, b: TokenizedSplit) -> None:
    assert len(a) == len(b)
    assert all(np.array_equal(x, y) for x, y in zip(a.input_ids, b.input_ids, strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(a.token_type_ids, b.token_type_ids, strict=True))
    assert np.array_equal(a.labels, b.labels)


def test_disabled_copies_the_train_split_unchanged(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    out, metrics = run_stage(dirs, tmp_path, enabled=False)
    assert filecmp.cmp(dirs[0] / "train.parquet", out / "train.parquet", shallow=False)
    assert metrics["examples_in"] == metrics["examples_out"] == 48 and metrics["variants"] == 0


def test_enabled_stage_writes_originals_then_variants(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    out, metrics = run_stage(dirs, tmp_path, enabled=True, n_variants=N, top_m=M, replace_prob=P)
    written = load_split(out, "train")
    train, *_, expected, _, stats = augment_tiny(dirs)
    assert_same_split(written, expected)  # the stage writes exactly what the library computes
    assert_same_split(written.subset(range(len(train))), train)  # originals first, unchanged
    assert len(train) < len(written) <= len(train) * (N + 1)
    assert metrics["examples_out"] == len(written) == stats.examples_out
    assert 0.3 < metrics["replaced_replaceable_share"] < 0.75  # about p (slightly above: no-ops dropped)
    assert "->" in (out / "examples.txt").read_text()


def test_variants_replace_only_words_by_their_top_m_neighbours(dirs: tuple[Path, Path]) -> None:
    train, emb, vocab, out, source, _ = augment_tiny(dirs)
    n = len(train)
    assert np.array_equal(source[:n], np.arange(n))
    counts = np.bincount(source[n:], minlength=n)
    assert counts.max() <= N and counts.sum() > n  # at most N per example, and plenty overall
    top = {}
    seen: set[tuple[int, bytes]] = set()
    replaced = 0
    for row in range(n, len(out)):
        i = int(source[row])
        orig, new = train.input_ids[i], out.input_ids[row]
        assert len(new) == len(orig)
        assert np.array_equal(out.token_type_ids[row], train.token_type_ids[i])
        assert out.labels[row] == train.labels[i]
        assert (i, new.tobytes()) not in seen  # no duplicate variants of one example
        seen.add((i, new.tobytes()))
        changed = np.flatnonzero(new != orig)
        assert len(changed) > 0  # variants identical to their original are dropped
        for pos in changed:
            word = int(orig[pos])
            assert not vocab.special[word] and vocab.replaceable[word]
            assert vocab.tokens[word] not in {"the", "and", "was", "[CLS]", "[SEP]"}
            if word not in top:
                top[word] = brute_force_top(emb, vocab.replaceable, word, M)
            assert int(new[pos]) in top[word], (vocab.tokens[word], vocab.tokens[int(new[pos])])
            replaced += 1
    assert replaced > 0


def test_neighbour_table_matches_brute_force(dirs: tuple[Path, Path]) -> None:
    train, emb, vocab, *_ = augment_tiny(dirs)
    present = sorted({int(t) for x in train.input_ids for t in x if vocab.replaceable[t]})
    table = nearest_neighbours(emb, present, vocab.replaceable, M, chunk_size=2)  # several chunks
    for word in present:
        assert table.counts[word] == M
        assert set(table.candidates[word].tolist()) == brute_force_top(emb, vocab.replaceable, word, M)
        assert np.all(np.diff(table.scores[word]) <= 0)  # best first
    never_queried = np.setdiff1d(np.arange(len(vocab)), present)
    assert np.all(table.counts[never_queried] == 0)


def test_zero_probability_adds_nothing(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    train, *_, out, _, stats = augment_tiny(dirs, replace_prob=0.0)
    assert_same_split(out, train)
    assert stats.variants == 0
    stage_out, metrics = run_stage(dirs, tmp_path, enabled=True, n_variants=N, top_m=M, replace_prob=0.0)
    assert_same_split(load_split(stage_out, "train"), train)
    assert metrics["variants"] == 0


def test_deterministic_for_a_seed_and_different_for_another(dirs: tuple[Path, Path]) -> None:
    *_, first, _, _ = augment_tiny(dirs, seed=3)
    *_, again, _, _ = augment_tiny(dirs, seed=3)
    *_, other, _, _ = augment_tiny(dirs, seed=4)
    assert_same_split(first, again)
    with pytest.raises(AssertionError):
        assert_same_split(first, other)


def test_max_examples_keeps_originals_first(dirs: tuple[Path, Path]) -> None:
    train, *_, full, _, _ = augment_tiny(dirs)
    n = len(train)
    capped_train, *_, capped, source, stats = augment_tiny(dirs, max_examples=n + 10)
    assert len(capped) == n + 10 and stats.variants == 10 and stats.variants_generated == len(full) - n
    assert np.array_equal(source[:n], np.arange(n))
    full_rows = {(int(s), x.tobytes()) for s, x in zip(augment_tiny(dirs)[4], full.input_ids, strict=True)}
    assert all((int(s), x.tobytes()) in full_rows for s, x in zip(source, capped.input_ids, strict=True))
    *_, again, _, _ = augment_tiny(dirs, max_examples=n + 10)
    assert_same_split(capped, again)  # the subset of variants is seeded too
    *_, few, few_source, _ = augment_tiny(dirs, max_examples=5)
    assert len(few) == 5 and np.array_equal(few_source, np.arange(5))
    *_, roomy, _, _ = augment_tiny(dirs, max_examples=10 * len(full))
    assert_same_split(roomy, full)


def test_vocabulary_and_positions_follow_the_wordpiece_convention() -> None:
    tokens = ["[PAD]", "[CLS]", "[SEP]", "the", "movie", "##s", ",", "42", "café", "good", "plot", "x1", "n"]
    vocab = Vocabulary.from_tokens(tokens, special_ids=[0, 1, 2])
    replaceable = {t for t, ok in zip(tokens, vocab.replaceable, strict=True) if ok}
    # No specials, stop words, pieces, punctuation, digits, non-ASCII or single letters.
    assert replaceable == {"movie", "good", "plot"}
    emb = np.random.default_rng(0).normal(size=(len(tokens), 8)).astype(np.float32)
    ids = np.array([1, 3, 4, 5, 6, 9, 10, 7, 4, 2])  # [CLS] the movie ##s , good plot 42 movie [SEP]
    table = build_neighbours(emb, vocab, [ids], top_m=5)
    # "movie ##s" is a two-piece word: only the single-piece "movie" near the end may be replaced.
    assert replaceable_positions(ids, vocab, table).tolist() == [5, 6, 8]
    assert table.counts[vocab.tokens.index("movie")] == 2  # only two other replaceable ids exist
    truncated = np.array([1, 4])  # a word cut by truncation before its pieces counts as single-piece
    assert replaceable_positions(truncated, vocab, table).tolist() == [1]


def test_embeddings_load_from_a_bare_backbone_and_fail_clearly(tiny_backbone: Path, tmp_path: Path) -> None:
    emb = load_word_embeddings(tiny_backbone)  # BertModel: no "bert." prefix
    assert emb.dtype == np.float32 and emb.shape == (len(WORDS) + 7, 32)  # + 5 specials, ".", ","
    with pytest.raises(FileNotFoundError, match="no safetensors tensor"):
        load_word_embeddings(tmp_path)
