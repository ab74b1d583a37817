"""Tokenised GLUE splits on disk (Parquet) and the batches every training and evaluation loop reads.

The data stage writes one Parquet file per split plus ``task.json``; everything downstream reads them
through :func:`load_split` and :func:`iter_batches`, which pads each batch only to its longest example
(dynamic padding) and derives the batch order from ``(seed, epoch)`` alone, so a resumed run can skip
exactly the batches it already trained on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynaflow.core.errors import DynaflowError

if TYPE_CHECKING:
    import torch

TASK_FILE = "task.json"
# Training rows set aside by the data stage and never trained on: where checkpoints are chosen
# (selection: heldout), so that the dev score a report shows was not used to pick what it reports.
HELDOUT = "heldout"
TOKENIZER_DIR = "tokenizer"


@dataclass
class TokenizedSplit:
    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    labels: np.ndarray  # int64 class ids, or float32 scores for regression

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, indices: np.ndarray | list[int]) -> TokenizedSplit:
        return TokenizedSplit(
            [self.input_ids[i] for i in indices],
            [self.token_type_ids[i] for i in indices],
            self.labels[indices],
        )


def write_split(path: Path, input_ids: list[list[int]], token_type_ids: list[list[int]], labels: Any) -> None:
    table = pa.table(
        {
            "input_ids": pa.array(input_ids, type=pa.list_(pa.int32())),
            "token_type_ids": pa.array(token_type_ids, type=pa.list_(pa.int8())),
            "label": pa.array(labels),
        }
    )
    pq.write_table(table, path)


def load_split(data_dir: Path, split: str) -> TokenizedSplit:
    path = Path(data_dir) / f"{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenised '{split}' split (run the data stage first)")
    table = pq.read_table(path)
    ids = [np.asarray(x, dtype=np.int64) for x in table.column("input_ids").to_numpy(zero_copy_only=False)]
    tts = [
        np.asarray(x, dtype=np.int64) for x in table.column("token_type_ids").to_numpy(zero_copy_only=False)
    ]
    return TokenizedSplit(ids, tts, table.column("label").to_numpy())


def read_task_meta(data_dir: Path) -> dict[str, Any]:
    path = Path(data_dir) / TASK_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing task metadata (run the data stage first)")
    return json.loads(path.read_text())


def pad(
    input_ids: Sequence[np.ndarray], token_type_ids: Sequence[np.ndarray], pad_id: int = 0, length: int = 0
) -> dict[str, np.ndarray]:
    """Token rows padded to the longest (or to ``length``, if that is longer), with their attention mask:
    int64 arrays, the inputs of every BERT here (training, ONNX Runtime, the server)."""
    longest = max(length, *(len(row) for row in input_ids))
    ids = np.full((len(input_ids), longest), pad_id, dtype=np.int64)
    types = np.zeros((len(input_ids), longest), dtype=np.int64)
    mask = np.zeros((len(input_ids), longest), dtype=np.int64)
    for row, (tokens, segments) in enumerate(zip(input_ids, token_type_ids, strict=True)):
        n = len(tokens)
        ids[row, :n], types[row, :n], mask[row, :n] = tokens, segments, 1
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


def load_heldout(data_dir: Path) -> TokenizedSplit:
    """The data stage's held-out training rows (selection: heldout); an error saying how to get them."""
    if not (Path(data_dir) / f"{HELDOUT}.parquet").is_file():
        raise DynaflowError(
            f"{data_dir}: no held-out slice to choose checkpoints on (data.heldout_examples is 0); set it "
            "above 0, or choose on dev or keep the last weights (selection: dev | last)"
        )
    return load_split(data_dir, HELDOUT)


def collate(
    split: TokenizedSplit, indices: list[int] | np.ndarray, pad_id: int = 0, length: int = 0
) -> dict[str, torch.Tensor]:
    """Pad a batch to its own longest example (or to ``length``, if that is longer)."""
    import torch  # imported here: reading splits and task metadata must not cost torch's import

    rows = [split.input_ids[i] for i in indices], [split.token_type_ids[i] for i in indices]
    batch = pad(*rows, pad_id, length)
    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    return tensors | {"labels": torch.as_tensor(split.labels[np.asarray(indices)])}


def batch_order(n: int, batch_size: int, shuffle: bool, seed: int, epoch: int) -> list[np.ndarray]:
    """Index batches for one epoch; a pure function of its arguments (what resume relies on)."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def iter_batches(
    split: TokenizedSplit,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    start: int = 0,
    pad_id: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    for indices in batch_order(len(split), batch_size, shuffle, seed, epoch)[start:]:
        yield collate(split, indices, pad_id)


def num_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)
