"""GLUE task registry and readers for the GLUE download layout (and the Hugging Face hub as fallback).

The local reader follows the files exactly as the GLUE download script (``download_glue_data.py``)
writes them and as Hugging Face's legacy ``transformers.data.processors.glue`` reads them:
tab-separated, split on ``\\t`` only (no CSV quoting: STS-B, RTE and QNLI sentences contain ``"``),
UTF-8, some files with a BOM (MRPC) and some without a trailing newline (CoLA dev).

Unlike the legacy processors, every row is validated (column count, label set, STS-B score range)
so that a truncated or mis-placed file fails loudly with its path and line number instead of
silently training on garbage.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from dynaflow.core.errors import DynaflowError

__all__ = [
    "TASKS",
    "ColumnLayout",
    "GlueFileNotFoundError",
    "HubUnavailableError",
    "MalformedDataError",
    "SplitData",
    "TaskSpec",
    "find_glue_dir",
    "get_task",
    "load_from_hub",
    "load_split",
    "read_split",
]

HUB_DATASET_ID = "nyu-mll/glue"
SKIP_HINT = "set `data.skip_malformed: true` in params.yaml to skip such rows (they are counted and reported)"
# How much of an offending row to quote in error messages: enough to recognise it, not a wall of text.
_ROW_PREVIEW_CHARS = 160
STSB_SCORE_RANGE = (0.0, 5.0)


class MalformedDataError(DynaflowError, ValueError):
    """A data row (or a whole file) does not match the task's GLUE layout."""


class GlueFileNotFoundError(DynaflowError, FileNotFoundError):
    """A split file is missing from the GLUE directory."""


class HubUnavailableError(DynaflowError, RuntimeError):
    """The Hugging Face hub copy of GLUE could not be loaded (offline, not cached, ...)."""


@dataclass(frozen=True)
class ColumnLayout:
    """Column structure of one GLUE ``.tsv`` file.

    ``columns`` names every tab-separated column (header names where the file has a header);
    the ``*_col`` fields are 0-based indices into a row.
    """

    columns: tuple[str, ...]
    has_header: bool
    text_a_col: int
    text_b_col: int | None
    label_col: int

    @property
    def n_cols(self) -> int:
        return len(self.columns)

    def describe(self) -> str:
        header = "with a header line" if self.has_header else "no header line"
        return f"{self.n_cols} tab-separated columns ({header}): " + "\t".join(self.columns)


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one GLUE task."""

    name: str  # canonical lower-case name, e.g. "sst2"
    dir_name: str  # directory in the GLUE download layout, e.g. "SST-2"
    labels: tuple[str, ...]  # label strings as written in the files; index = class id. () for regression
    is_regression: bool
    metric_names: tuple[str, ...]
    main_metric: str
    dev_splits: tuple[str, ...]  # first one is the split used for model selection
    hub_config: str
    hub_text_columns: tuple[str, ...]  # text columns in the nyu-mll/glue hub dataset
    train_layout: ColumnLayout
    dev_layout: ColumnLayout
    aliases: tuple[str, ...] = field(default=())
    hub_id: str = HUB_DATASET_ID

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.labels)

    @property
    def has_text_pair(self) -> bool:
        return self.train_layout.text_b_col is not None

    @property
    def main_dev_split(self) -> str:
        return self.dev_splits[0]

    @property
    def splits(self) -> tuple[str, ...]:
        """Labelled splits that :func:`read_split` accepts (besides the alias ``"dev"``)."""
        return ("train", *self.dev_splits)

    def layout_for(self, split: str) -> ColumnLayout:
        return self.train_layout if split == "train" else self.dev_layout


# --- Layouts -------------------------------------------------------------------------------------
# Each layout is the header (or, for CoLA, the column meaning) of the file written by the GLUE
# download script, with the column indices HF's legacy glue processors use
# (transformers/data/processors/glue.py: Sst2Processor, ColaProcessor, StsbProcessor, ...).

# SST-2 train/dev: header "sentence\tlabel"; processor reads text line[0], label line[1].
_SST2 = ColumnLayout(("sentence", "label"), True, text_a_col=0, text_b_col=None, label_col=1)
# CoLA train/dev: NO header; "source\tlabel\tlabel_mark\tsentence" (mark is "" or "*");
# processor reads text line[3], label line[1].
_COLA = ColumnLayout(("source", "label", "original_label_mark", "sentence"), False, 3, None, 1)
# STS-B train/dev: 10 columns with header; processor reads line[7], line[8], score line[-1] (= 9).
_STSB = ColumnLayout(
    (
        "index",
        "genre",
        "filename",
        "year",
        "old_index",
        "source1",
        "source2",
        "sentence1",
        "sentence2",
        "score",
    ),
    True,
    7,
    8,
    9,
)
# MRPC train/dev: header "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String" (BOM in the original);
# processor reads line[3], line[4], label line[0].
_MRPC = ColumnLayout(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), True, 3, 4, 0)
# RTE train/dev: header "index\tsentence1\tsentence2\tlabel"; processor reads line[1], line[2], line[-1].
_RTE = ColumnLayout(("index", "sentence1", "sentence2", "label"), True, 1, 2, 3)
# QNLI train/dev: header "index\tquestion\tsentence\tlabel"; processor reads line[1], line[2], line[-1].
_QNLI = ColumnLayout(("index", "question", "sentence", "label"), True, 1, 2, 3)
# WNLI train/dev: same shape as RTE; labels "0"/"1" (1 = entailment).
_WNLI = ColumnLayout(("index", "sentence1", "sentence2", "label"), True, 1, 2, 3)
# QQP train/dev: header "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate";
# processor reads line[3], line[4], line[5] (and silently skips short rows; we make that opt-in).
_QQP = ColumnLayout(("id", "qid1", "qid2", "question1", "question2", "is_duplicate"), True, 3, 4, 5)
_MNLI_COMMON = (
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
)
# MNLI train: 12 columns ending "label1\tgold_label"; dev_matched/dev_mismatched: 16 columns ending
# "label1..label5\tgold_label". Processor reads line[8], line[9], label line[-1].
_MNLI_TRAIN = ColumnLayout((*_MNLI_COMMON, "label1", "gold_label"), True, 8, 9, 11)
_MNLI_DEV = ColumnLayout(
    (*_MNLI_COMMON, "label1", "label2", "label3", "label4", "label5", "gold_label"), True, 8, 9, 15
)

_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
# Selection metrics follow DynaBERT's run_glue.py: the first metric listed is the one it uses.
_ACC = ("acc",)
_ACC_F1 = ("acc", "f1", "acc_and_f1")


def _spec(
    name: str,
    dir_name: str,
    labels: tuple[str, ...],
    metrics: tuple[str, ...],
    hub_cols: tuple[str, ...],
    train: ColumnLayout,
    dev: ColumnLayout | None = None,
    *,
    regression: bool = False,
    dev_splits: tuple[str, ...] = ("dev",),
    aliases: tuple[str, ...] = (),
) -> TaskSpec:
    return TaskSpec(
        name=name,
        dir_name=dir_name,
        labels=labels,
        is_regression=regression,
        metric_names=metrics,
        main_metric=metrics[0],
        dev_splits=dev_splits,
        hub_config=name,
        hub_text_columns=hub_cols,
        train_layout=train,
        dev_layout=dev or train,
        aliases=aliases,
    )


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        _spec("sst2", "SST-2", _BINARY, _ACC, ("sentence",), _SST2, aliases=("sst-2", "sst")),
        _spec("cola", "CoLA", _BINARY, ("mcc",), ("sentence",), _COLA),
        _spec(
            "stsb",
            "STS-B",
            (),
            ("pearson", "spearmanr", "corr"),
            ("sentence1", "sentence2"),
            _STSB,
            regression=True,
            aliases=("sts-b", "sts"),
        ),
        _spec("mrpc", "MRPC", _BINARY, _ACC_F1, ("sentence1", "sentence2"), _MRPC),
        _spec("rte", "RTE", _NLI2, _ACC, ("sentence1", "sentence2"), _RTE),
        _spec("qnli", "QNLI", _NLI2, _ACC, ("question", "sentence"), _QNLI),
        # Label order as in HF's legacy MnliProcessor (and DynaBERT), NOT the hub's ClassLabel order
        # (entailment, neutral, contradiction); load_from_hub remaps by name.
        _spec(
            "mnli",
            "MNLI",
            ("contradiction", "entailment", "neutral"),
            _ACC,
            ("premise", "hypothesis"),
            _MNLI_TRAIN,
            _MNLI_DEV,
            dev_splits=("dev_matched", "dev_mismatched"),
            aliases=("mnli-m", "mnli-mm"),
        ),
        _spec("qqp", "QQP", _BINARY, _ACC_F1, ("question1", "question2"), _QQP),
        _spec("wnli", "WNLI", _BINARY, _ACC, ("sentence1", "sentence2"), _WNLI),
    )
}

_ALIASES: dict[str, str] = {}
for _t in TASKS.values():
    for _a in (_t.name, _t.dir_name, *_t.aliases):
        _ALIASES[_a.lower()] = _t.name


def get_task(name: str | TaskSpec) -> TaskSpec:
    """Look a task up by canonical name or alias (case-insensitive): "sst2", "SST-2", "mnli-mm", ...

    "mnli-mm" maps to "mnli", whose ``dev_splits`` hold both the matched and mismatched dev sets.
    """
    if isinstance(name, TaskSpec):
        return name
    key = str(name).strip().lower()
    if key in _ALIASES:
        return TASKS[_ALIASES[key]]
    allowed = ", ".join(sorted(TASKS))
    aliases = ", ".join(sorted(a for a in _ALIASES if a not in TASKS))
    raise ValueError(f"unknown GLUE task {name!r}; allowed: {allowed} (aliases, case-insensitive: {aliases})")


# --- Reading -------------------------------------------------------------------------------------


@dataclass
class SplitData:
    """One labelled split: parallel lists of texts and labels (class ids, or floats for STS-B)."""

    text_a: list[str]
    text_b: list[str] | None
    labels: list[int] | list[float]
    n_skipped: int = 0
    skipped: list[str] = field(default_factory=list)  # short description per skipped row
    source: str = ""  # file path or hub id, for logs

    def __len__(self) -> int:
        return len(self.labels)


def find_glue_dir(configured: str | os.PathLike[str] | None) -> Path | None:
    """The GLUE directory to read: the configured value first, else env ``GLUE_DIR``, else None."""
    if configured is not None and str(configured).strip():
        return Path(configured).expanduser()
    env = os.environ.get("GLUE_DIR", "").strip()
    return Path(env).expanduser() if env else None


def _resolve_split(task: TaskSpec, split: str) -> str:
    """Canonical split name; "dev" (and "validation") mean the task's selection dev split."""
    s = split.strip().lower()
    if s in ("dev", "validation"):
        return task.main_dev_split
    if s in ("validation_matched", "validation_mismatched"):
        s = s.replace("validation", "dev")
    if s in task.splits:
        return s
    raise ValueError(
        f"unknown split {split!r} for task {task.name}; allowed: {', '.join(task.splits)} "
        "('dev' = " + task.main_dev_split + "; unlabelled test splits are not supported)"
    )


def _preview(row: str) -> str:
    r = repr(row)
    return r if len(r) <= _ROW_PREVIEW_CHARS else r[: _ROW_PREVIEW_CHARS - 3] + "..."


def _parse_label(task: TaskSpec, raw: str) -> int | float | str:
    """Return the label, or an error string saying what was expected."""
    value = raw.strip()
    if task.is_regression:
        try:
            score = float(value)
        except ValueError:
            return f"a float score in [{STSB_SCORE_RANGE[0]:g}, {STSB_SCORE_RANGE[1]:g}], got {value!r}"
        lo, hi = STSB_SCORE_RANGE
        if not math.isfinite(score) or not lo <= score <= hi:
            return f"a score in [{lo:g}, {hi:g}], got {value!r}"
        return score
    try:
        return task.labels.index(value)
    except ValueError:
        return f"a label in {list(task.labels)}, got {value!r}"


def read_split(
    task: str | TaskSpec, glue_dir: str | os.PathLike[str], split: str, skip_malformed: bool = False
) -> SplitData:
    """Read ``<glue_dir>/<Task dir>/<split>.tsv`` in the GLUE download layout.

    ``split`` is "train", "dev" (the selection dev split) or one of ``task.dev_splits``
    (MNLI: "dev_matched", "dev_mismatched"). Malformed rows raise :class:`MalformedDataError`
    (file, 1-based line number, row, expectation) unless ``skip_malformed``, which skips and counts them.
    A bad header or undecodable file always raises: that means the wrong file, not a stray row.
    """
    spec = get_task(task)
    split = _resolve_split(spec, split)
    layout = spec.layout_for(split)
    path = Path(glue_dir).expanduser() / spec.dir_name / f"{split}.tsv"
    if not path.is_file():
        root_ok = Path(glue_dir).expanduser().is_dir()
        where = "" if root_ok else f" (the GLUE directory {glue_dir} does not exist)"
        raise GlueFileNotFoundError(
            f"GLUE file not found: {path}{where}. Expected the GLUE download layout "
            f"<glue_dir>/{spec.dir_name}/{{{', '.join(spec.splits)}}}.tsv, each with {layout.describe()}"
        )
    try:
        # utf-8-sig drops MRPC's BOM; newline="" keeps "\r" and exotic line breaks inside sentences as-is.
        with open(path, encoding="utf-8-sig", newline="") as fh:
            content = fh.read()
    except UnicodeDecodeError as exc:
        raise MalformedDataError(f"{path}: not valid UTF-8 ({exc}); expected a GLUE .tsv file") from exc

    # Split on "\n" only: str.splitlines() would also break on \x0b, \x1c, \u2028, ... inside sentences.
    lines = content.split("\n")
    if lines and lines[-1] == "":  # trailing newline (absent in CoLA dev, present elsewhere)
        lines.pop()

    text_a: list[str] = []
    text_b: list[str] | None = [] if layout.text_b_col is not None else None
    labels: list = []
    skipped: list[str] = []
    start = 0
    if layout.has_header:
        header = lines[0].split("\t") if lines else []
        if len(header) != layout.n_cols:
            raise MalformedDataError(
                f"{path}:1: header {_preview(lines[0] if lines else '')} has {len(header)} column(s); "
                f"expected {layout.describe()}. Is this the right file for task {spec.name}?"
            )
        # A header-less file (e.g. an SST-2 subsample) would silently lose its first example as "header".
        if not isinstance(_parse_label(spec, header[layout.label_col]), str):
            raise MalformedDataError(
                f"{path}:1: first line {_preview(lines[0])} looks like a data row, but this file should "
                f"start with a header line: {layout.describe()}"
            )
        start = 1

    for idx in range(start, len(lines)):
        raw = lines[idx]  # a CRLF "\r" ends up in the last column, which is stripped like all fields
        cols = raw.split("\t")
        problem = ""
        if len(cols) != layout.n_cols:
            problem = f"{len(cols)} column(s), expected {layout.describe()}"
        else:
            label = _parse_label(spec, cols[layout.label_col])
            if isinstance(label, str):  # _parse_label returns the expectation text on failure
                col = layout.label_col
                problem = f"bad label in column {col + 1} ({layout.columns[col]}): expected {label}"
        if problem:
            lineno = idx + 1
            if not skip_malformed:
                raise MalformedDataError(
                    f"{path}:{lineno}: malformed row {_preview(raw)}: {problem}. Hint: {SKIP_HINT}."
                )
            skipped.append(f"line {lineno}: {problem[:120]}")
            continue
        text_a.append(cols[layout.text_a_col].strip())
        if text_b is not None:
            text_b.append(cols[layout.text_b_col].strip())  # type: ignore[index]
        labels.append(label)

    if not labels:  # an empty (e.g. truncated-to-header) file would otherwise fail far downstream
        raise MalformedDataError(
            f"{path}: no usable data rows ({len(skipped)} malformed skipped); expected {layout.describe()}"
        )
    return SplitData(text_a, text_b, labels, n_skipped=len(skipped), skipped=skipped, source=str(path))


# --- Hub -----------------------------------------------------------------------------------------

_HUB_SPLITS = {
    "train": "train",
    "dev": "validation",
    "dev_matched": "validation_matched",
    "dev_mismatched": "validation_mismatched",
}


def load_from_hub(task: str | TaskSpec, split: str) -> SplitData:
    """Load a labelled split from ``nyu-mll/glue`` via ``datasets`` (cache or network).

    Class ids are remapped by label name to this module's order (matters for MNLI).
    Raises :class:`HubUnavailableError` when the hub cannot be reached and nothing is cached.
    """
    spec = get_task(task)
    split = _resolve_split(spec, split)
    hub_split = _HUB_SPLITS[split]
    try:
        import datasets  # deferred: heavy import, only needed for the hub fallback

        ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=hub_split)
    except Exception as exc:  # offline, not cached, hub error: all mean "use local files instead"
        raise HubUnavailableError(
            f"could not load GLUE task {spec.name!r} split {hub_split!r} from the Hugging Face hub "
            f"({spec.hub_id}, config {spec.hub_config!r}): {type(exc).__name__}: {exc}. Set the GLUE_DIR "
            f"environment variable (or `data.glue_dir` in params.yaml) to a directory in the GLUE download "
            f"layout, e.g. <glue_dir>/{spec.dir_name}/{{{', '.join(spec.splits)}}}.tsv"
        ) from exc

    cols = spec.hub_text_columns
    raw_labels = list(ds["label"])
    if spec.is_regression:
        labels: list = [float(x) for x in raw_labels]
    else:
        names = getattr(ds.features["label"], "names", None)
        if names and all(n in spec.labels for n in names):
            # Named classes (MNLI, RTE, QNLI): map hub id -> name -> our id.
            remap = [spec.labels.index(n) for n in names]
        else:
            # Numeric GLUE labels ("0"/"1"): the hub's ids are the file's labels (e.g. 1 = acceptable).
            remap = list(range(spec.num_labels))
        if any(not 0 <= int(x) < len(remap) for x in raw_labels):
            raise MalformedDataError(
                f"{spec.hub_id}/{spec.hub_config} split {hub_split!r} has labels outside "
                f"0..{len(remap) - 1} (unlabelled test split?)"
            )
        labels = [remap[int(x)] for x in raw_labels]
    text_a = [str(s).strip() for s in ds[cols[0]]]
    text_b = [str(s).strip() for s in ds[cols[1]]] if len(cols) > 1 else None
    return SplitData(text_a, text_b, labels, source=f"{spec.hub_id}/{spec.hub_config}:{hub_split}")


def load_split(
    task: str | TaskSpec,
    split: str,
    glue_dir: str | os.PathLike[str] | None = None,
    skip_malformed: bool = False,
) -> SplitData:
    """Read from the local GLUE dir (configured, else ``GLUE_DIR``) if there is one, else from the hub."""
    root = find_glue_dir(glue_dir)
    if root is not None:
        return read_split(task, root, split, skip_malformed=skip_malformed)
    return load_from_hub(task, split)
