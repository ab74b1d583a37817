"""Offline data augmentation in token space: swap words for their neighbours in the word-embedding matrix.

TinyBERT's augmentation (used by DynaBERT with ``--data_aug``) makes N variants of every training sentence;
in each, every non-stop word is replaced with probability p by one of M candidates, drawn uniformly. The
candidates come from a masked language model (BERT-base) for single-piece words and from GloVe for
multi-piece ones. Neither is available offline, so here the candidates of a word are its M nearest
neighbours, by cosine similarity, among the rows of the model's own input word-embedding matrix.

Differences from the TinyBERT script, all deliberate:

* candidates are context-free embedding neighbours, not masked-LM predictions in context;
* only single-piece words are replaced, by single-piece words, so every variant has exactly the length
  and the ``token_type_ids`` of its original (no re-tokenisation, no re-truncation); multi-piece words
  (``play ##ing``) are left as they are;
* both segments of a sentence pair are augmented together in one variant (the script augments one column
  at a time);
* substitutes are restricted to the same kind of token that may be replaced: ASCII letters, two or more,
  not special, not a ``##`` piece, not a stop word (the script filters only ``##`` pieces from masked-LM
  candidates).

What is kept: N variants at most per example, duplicates and variants identical to the original dropped
(the script does the same), uniform choice among the candidates, the original examples kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dynaflow.data.splits import TokenizedSplit

CONTINUATION_PREFIX = "##"  # WordPiece: a token with this prefix continues the word before it

# Word-embedding keys: a saved BertForSequenceClassification (the teacher) and a bare BertModel (backbone).
EMBEDDING_KEYS = ("bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight")

# Function words are never replaced nor used as substitutes, as TinyBERT skips stop words (its list is
# NLTK's English one). Negations are here on purpose: swapping "not" for a neighbour flips sentiment.
# The contraction fragments cover what WordPiece leaves of "don't", "isn't", ... ("don", "'", "t").
STOP_WORDS = frozenset(
    """
    i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers
    herself it its itself they them their theirs themselves what which who whom this that these those am is
    are was were be been being have has had having do does did doing a an the and but if or because as until
    while of at by for with about against between into through during before after above below to from up
    down in out on off over under again further then once here there when where why how all any both each
    few more most other some such no nor not only own same so than too very can will just should now
    s t d ll m o re ve y don didn doesn isn aren wasn weren hasn haven hadn won wouldn couldn shouldn mustn
    mightn needn shan ain ma
    """.split()
)

# Separate RNG streams, so that capping the output never changes which variants are generated.
_VARIANT_STREAM = 0x617567  # "aug"
_SELECT_STREAM = 0x73656C  # "sel"


@dataclass(frozen=True)
class Vocabulary:
    """What the augmentation needs to know about each vocabulary id (arrays indexed by token id)."""

    tokens: list[str]
    replaceable: np.ndarray  # bool: a single-piece word that may be replaced and may be a substitute
    continuation: np.ndarray  # bool: a ``##`` piece (continues the previous word)
    special: np.ndarray  # bool: [CLS], [SEP], [PAD], ...

    @classmethod
    def from_tokens(
        cls,
        tokens: Sequence[str | None],
        special_ids: Iterable[int],
        stop_words: frozenset[str] = STOP_WORDS,
    ) -> Vocabulary:
        """Classify every token; ``None`` (an id the tokenizer does not know) is never replaceable."""
        toks = [t or "" for t in tokens]
        special = np.zeros(len(toks), dtype=bool)
        special[[i for i in special_ids if 0 <= i < len(toks)]] = True
        continuation = np.array([t.startswith(CONTINUATION_PREFIX) for t in toks], dtype=bool)
        # ASCII letters only, as TinyBERT's ``_is_valid`` ([a-z] after lower-casing): this also keeps the
        # many single CJK / accented characters of BERT's vocabulary out of the candidates. Single letters
        # are left alone too: after WordPiece they are mostly fragments ("n ' t", initials), not words.
        wordlike = np.array(
            [len(t) > 1 and t.isascii() and t.isalpha() and t.lower() not in stop_words for t in toks],
            dtype=bool,
        )
        return cls(list(toks), wordlike & ~special & ~continuation, continuation, special)

    def __len__(self) -> int:
        return len(self.tokens)


def load_vocabulary(tokenizer_dir: Path, size: int | None = None) -> Vocabulary:
    """The vocabulary of a saved Hugging Face tokenizer, padded or cut to ``size`` ids (embedding rows)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    size = len(tokenizer) if size is None else size
    known = min(size, len(tokenizer))
    tokens: list[str | None] = list(tokenizer.convert_ids_to_tokens(list(range(known))))
    tokens += [None] * (size - known)  # embedding rows the tokenizer never produces
    return Vocabulary.from_tokens(tokens, tokenizer.all_special_ids)


def load_word_embeddings(model_dir: Path, keys: Sequence[str] = EMBEDDING_KEYS) -> np.ndarray:
    """The input word-embedding matrix (vocab x hidden, float32) of a saved model, read with safetensors.

    Reads only that tensor (no model is built); handles sharded checkpoints through their index file.
    """
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = {k: model_dir / weight_map[k] for k in keys if k in weight_map}
    else:
        files = {k: model_dir / "model.safetensors" for k in keys}
    for key, path in files.items():
        if not path.is_file():
            continue
        with safe_open(str(path), framework="pt") as fh:  # "pt": numpy cannot hold bf16 checkpoints
            if key in fh.keys():  # safe_open is not a mapping: no ``in fh``
                return fh.get_tensor(key).float().numpy()
    raise FileNotFoundError(f"{model_dir}: no safetensors tensor named any of {list(keys)}")


@dataclass(frozen=True)
class NeighbourTable:
    """Top-M substitutes per vocabulary id; only the ids that were asked for have rows filled."""

    candidates: np.ndarray  # (vocab, M) int64, best first, -1 where there are fewer than M
    counts: np.ndarray  # (vocab,) int64: valid candidates per id (0 = never replaced)
    scores: np.ndarray = field(repr=False)  # (vocab, M) float32 cosine similarities, NaN where no candidate


def nearest_neighbours(
    embeddings: np.ndarray,
    query_ids: Iterable[int],
    allowed: np.ndarray,
    top_m: int,
    chunk_size: int = 256,
) -> NeighbourTable:
    """Cosine top-``top_m`` neighbours among the ``allowed`` ids, for each query id (itself excluded).

    The matrix is normalised once and only the allowed columns are kept, so each chunk of queries is one
    (chunk x allowed) matrix product plus a partial sort; memory stays at ``chunk_size`` rows of scores.
    """
    vocab = embeddings.shape[0]
    if allowed.shape != (vocab,):
        raise ValueError(f"allowed has shape {allowed.shape}, expected ({vocab},)")
    emb = np.asarray(embeddings, dtype=np.float32)
    # The epsilon keeps all-zero rows (never-trained ids) at similarity 0 instead of NaN.
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    columns = np.flatnonzero(allowed)
    column_of = np.full(vocab, -1, dtype=np.int64)
    column_of[columns] = np.arange(len(columns))
    targets = unit[columns].T.copy()  # (hidden, allowed): contiguous for the matrix products below

    candidates = np.full((vocab, top_m), -1, dtype=np.int64)
    scores = np.full((vocab, top_m), np.nan, dtype=np.float32)
    counts = np.zeros(vocab, dtype=np.int64)
    queries = np.unique(np.fromiter(query_ids, dtype=np.int64))
    queries = queries[(queries >= 0) & (queries < vocab)]
    m = min(top_m, len(columns))
    for start in range(0, len(queries), chunk_size):
        ids = queries[start : start + chunk_size]
        sims = unit[ids] @ targets
        own = column_of[ids]
        rows = np.flatnonzero(own >= 0)
        sims[rows, own[rows]] = -np.inf  # a word is not its own substitute
        if m == 0:
            continue
        if m < sims.shape[1]:
            top = np.argpartition(-sims, m - 1, axis=1)[:, :m]
        else:
            top = np.broadcast_to(np.arange(sims.shape[1]), (len(ids), sims.shape[1]))
        top_sims = np.take_along_axis(sims, top, axis=1)
        # Best first; the stable sort on (-similarity, column) makes ties deterministic.
        order = np.lexsort((top, -top_sims), axis=1)
        top, top_sims = np.take_along_axis(top, order, axis=1), np.take_along_axis(top_sims, order, axis=1)
        valid = np.isfinite(top_sims)
        candidates[ids, :m] = np.where(valid, columns[top], -1)
        scores[ids, :m] = np.where(valid, top_sims, np.nan)
        counts[ids] = valid.sum(axis=1)
    return NeighbourTable(candidates, counts, scores)


def build_neighbours(
    embeddings: np.ndarray, vocab: Vocabulary, input_ids: Iterable[np.ndarray], top_m: int
) -> NeighbourTable:
    """Neighbour table for the replaceable ids that occur in ``input_ids`` (candidates: replaceable ids)."""
    if embeddings.shape[0] != len(vocab):
        raise ValueError(f"{embeddings.shape[0]} embedding rows but {len(vocab)} vocabulary entries")
    present = np.unique(np.concatenate([np.asarray(x, dtype=np.int64) for x in input_ids] or [np.zeros(0)]))
    present = present[vocab.replaceable[present.astype(np.int64)]].astype(np.int64)
    return nearest_neighbours(embeddings, present, vocab.replaceable, top_m)


def decode(input_ids: Sequence[int] | np.ndarray, vocab: Vocabulary) -> str:
    """Readable text for logs and samples: tokens joined by spaces, ``##`` pieces glued, padding dropped."""
    text = " ".join(vocab.tokens[int(i)] for i in input_ids if vocab.tokens[int(i)] != "[PAD]")
    return text.replace(f" {CONTINUATION_PREFIX}", "")


def word_starts(input_ids: np.ndarray, vocab: Vocabulary) -> np.ndarray:
    """Bool mask of the positions that begin a word (neither a special token nor a ``##`` piece)."""
    return ~vocab.continuation[input_ids] & ~vocab.special[input_ids]


def replaceable_positions(input_ids: np.ndarray, vocab: Vocabulary, table: NeighbourTable) -> np.ndarray:
    """Positions of single-piece words that may be replaced and have at least one candidate."""
    ids = np.asarray(input_ids, dtype=np.int64)
    # Single-piece: the next token does not continue this one (the last position has no next token).
    followed = np.zeros(len(ids), dtype=bool)
    followed[:-1] = vocab.continuation[ids[1:]]
    return np.flatnonzero(vocab.replaceable[ids] & ~followed & (table.counts[ids] > 0))


@dataclass
class AugmentStats:
    examples_in: int = 0
    examples_out: int = 0
    variants: int = 0
    variants_generated: int = 0  # before the max_examples cap
    words: int = 0  # words in the originals (special tokens excluded, a ``##`` piece is part of a word)
    replaceable_words: int = 0  # of those, words that may be replaced (with at least one candidate)
    replaced_words: int = 0  # words replaced, summed over the kept variants
    words_in_variants: int = 0
    replaceable_in_variants: int = 0

    def as_metrics(self) -> dict[str, float | int]:
        n = max(self.examples_in, 1)
        return {
            "examples_in": self.examples_in,
            "examples_out": self.examples_out,
            "variants": self.variants,
            "variants_generated": self.variants_generated,
            "variants_per_example": self.variants / n,
            "replaceable_word_share": self.replaceable_words / max(self.words, 1),
            # Share of all words of the kept variants that differ from the original ...
            "replaced_word_share": self.replaced_words / max(self.words_in_variants, 1),
            # ... and of the replaceable ones: a little above p, since unchanged variants are dropped.
            "replaced_replaceable_share": self.replaced_words / max(self.replaceable_in_variants, 1),
        }


def augment_split(
    split: TokenizedSplit,
    vocab: Vocabulary,
    table: NeighbourTable,
    n_variants: int,
    replace_prob: float,
    seed: int,
    max_examples: int | None = None,
    progress: bool = False,
) -> tuple[TokenizedSplit, np.ndarray, AugmentStats]:
    """Originals followed by up to ``n_variants`` distinct variants of each (in example order).

    Each example draws from its own generator seeded by ``(seed, index)``, so its variants do not depend
    on the other examples. With ``max_examples``, the originals come first (cut to the cap if they alone
    exceed it) and a seeded random subset of the variants fills the rest, in generation order.

    Returns the new split, the index of each output example's original, and statistics.
    """
    from tqdm.auto import tqdm

    stats = AugmentStats(examples_in=len(split))
    var_ids: list[np.ndarray] = []
    var_source: list[int] = []
    var_replaced: list[int] = []
    var_words: list[int] = []
    var_replaceable: list[int] = []
    for i in tqdm(
        range(len(split)), desc="augment", unit="example", disable=not progress, dynamic_ncols=True
    ):
        ids = np.asarray(split.input_ids[i], dtype=np.int64)
        n_words = int(word_starts(ids, vocab).sum())
        pos = replaceable_positions(ids, vocab, table)
        stats.words += n_words
        stats.replaceable_words += len(pos)
        if len(pos) == 0 or replace_prob <= 0:
            continue
        rng = np.random.default_rng([_VARIANT_STREAM, seed, i])
        originals = ids[pos]
        replace = rng.random((n_variants, len(pos))) < replace_prob
        pick = rng.integers(0, table.counts[originals], size=(n_variants, len(pos)))  # uniform, as TinyBERT
        substitutes = table.candidates[originals[None, :], pick]
        variants = np.tile(ids, (n_variants, 1))
        variants[:, pos] = np.where(replace, substitutes, originals)
        seen = {ids.tobytes()}
        for row, changed in zip(variants, replace.sum(axis=1), strict=True):
            key = row.tobytes()
            if changed == 0 or key in seen:  # identical to the original or to an earlier variant
                continue
            seen.add(key)
            var_ids.append(row)
            var_source.append(i)
            var_replaced.append(int(changed))
            var_words.append(n_words)
            var_replaceable.append(len(pos))
    stats.variants_generated = len(var_ids)

    n_orig = len(split)
    keep_orig = n_orig if max_examples is None else min(n_orig, max_examples)
    room = len(var_ids) if max_examples is None else max(0, min(len(var_ids), max_examples - keep_orig))
    if room < len(var_ids):
        select = np.random.default_rng([_SELECT_STREAM, seed])
        chosen = np.sort(select.choice(len(var_ids), size=room, replace=False))
    else:
        chosen = np.arange(len(var_ids))
    source = np.concatenate([np.arange(keep_orig), np.asarray(var_source, dtype=np.int64)[chosen]])
    input_ids = [np.asarray(split.input_ids[i], dtype=np.int64) for i in range(keep_orig)]
    input_ids += [var_ids[j] for j in chosen]
    out = TokenizedSplit(input_ids, [split.token_type_ids[i] for i in source], split.labels[source])

    stats.variants = len(chosen)
    stats.examples_out = len(out)
    stats.replaced_words = int(sum(var_replaced[j] for j in chosen))
    stats.words_in_variants = int(sum(var_words[j] for j in chosen))
    stats.replaceable_in_variants = int(sum(var_replaceable[j] for j in chosen))
    return out, source, stats
