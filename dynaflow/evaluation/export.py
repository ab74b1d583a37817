"""Export a candidate as a deployable artifact, checked against its reference before it is published.

* Hugging Face directory: the candidate's model (``save_pretrained``), the tokenizer, a model card
  (``README.md``), ``export.json`` and whatever files the method needs to load it without dynaflow
  (``Candidate.remote_code``, e.g. ``modeling_elastic_bert.py`` for ``trust_remote_code=True``).
* ONNX (``model.onnx``): inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64,
  ``[batch, sequence]``, both dynamic), output ``logits``.

Before anything is published the saved files are loaded back and their logits compared with the
candidate's reference (DynaBERT: the elastic model at that width and depth) on a real dev batch (padding
included); beyond ``atol`` (1e-4) the export fails with :class:`ExportMismatch`.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dynaflow.core.artifacts import staged_output

if TYPE_CHECKING:
    from dynaflow.data.splits import TokenizedSplit
    from dynaflow.evaluation.candidates import Candidate

ATOL = 1e-4
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
# Dynamic int8 quantises each activation tensor with one scale from its own range, the whole batch and its
# padding included: an example's int8 logits depend on what shares its batch. Int8 models are scored one
# example at a time, as an ONNX Runtime CPU profile serves them.
INT8_SCORING_BATCH = 1
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]

# Readable names for the GLUE tasks whose files label classes "0" / "1".
READABLE_LABELS = {
    "sst2": ["negative", "positive"],
    "cola": ["unacceptable", "acceptable"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qqp": ["not_duplicate", "duplicate"],
    "wnli": ["not_entailment", "entailment"],
}


class ExportMismatch(RuntimeError):
    """An exported artifact does not reproduce its reference logits."""


def label_names(meta: Mapping[str, Any]) -> list[str] | None:
    """Class names for ``config.id2label`` from the data stage's ``task.json`` (None for regression)."""
    if meta.get("is_regression"):
        return None
    return READABLE_LABELS.get(meta.get("task", ""), [str(x) for x in meta.get("labels", [])]) or None


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits


def export_onnx(
    model: torch.nn.Module,
    path: Path,
    opset: int = 17,
    exporter: str = "torchscript",
) -> Path:
    """Write ``model`` (a candidate's standalone model, on CPU) as ONNX, batch and sequence axes dynamic."""
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    wrapper = _LogitsOnly(model).eval()  # the exporter restores the wrapper's mode, and with it the model's
    ids = torch.randint(1, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    example = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    axes["logits"] = {0: "batch"}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo (kept: ~10x faster, same graph here);
        # the tracer warns about Python conditions on shapes, which are static in an extracted model.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, example, str(path), input_names=INPUT_NAMES, output_names=["logits"],
            dynamic_axes=axes, opset_version=opset, dynamo=exporter == "dynamo",
            **({"external_data": False} if exporter == "dynamo" else {}),
        )  # fmt: skip
    model.train(was_training)
    return path


def reference_batch(data_dir: Path | None, vocab_size: int, n: int = 16) -> dict[str, torch.Tensor]:
    """The first ``n`` dev examples, padded (a real batch with masking); random ids without data."""
    if data_dir is not None:
        from dynaflow.data.splits import collate, load_split, read_task_meta

        split = load_split(data_dir, read_task_meta(data_dir)["dev_splits"][0])
        batch = collate(split, list(range(min(n, len(split)))))
        batch.pop("labels")
        return batch
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab_size, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@torch.inference_mode()
def model_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """A sequence classifier's logits on ``batch``, in eval mode (its mode is restored)."""
    was_training = model.training
    model.eval()
    out = model(**batch).logits.float().cpu().numpy()
    model.train(was_training)
    return out


def onnx_logits(path: Path, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """An ONNX model's logits on one batch (one thread)."""
    return onnx_logits_fn(path, threads=1)(batch).numpy()


def onnx_logits_fn(path: Path, threads: int) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """An ONNX model as a batch -> logits function (one session for every call), for dev scoring."""
    from dynaflow.evaluation.hardware import ort_session

    session = ort_session(path, threads)
    wanted = {i.name for i in session.get_inputs()}

    def fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        feed = {k: v.numpy().astype(np.int64) for k, v in batch.items() if k in wanted}
        return torch.from_numpy(session.run(None, feed)[0])

    return fn


# ``evaluate.int8_recipe``: quantize_dynamic's options for the CPU the int8 models are meant for.
INT8_RECIPES: dict[str, dict[str, bool]] = {
    # Hugging Face Optimum's avx512_vnni dynamic recipe (per-tensor scales, 8-bit weights): u8 x s8 products
    # run on VNNI; what CPU users try first.
    "vnni": {},
    # For x86 CPUs without VNNI: their u8 x s8 products can saturate, so ONNX Runtime advises 7-bit weights
    # (reduce_range); per-channel scales win back what that costs. On an AVX2-only machine this kept 0.9
    # points more than "vnni" (BENCHMARKS.md, issue 18, session 12); on a VNNI machine both run as fast.
    "avx2": {"per_channel": True, "reduce_range": True},
}


def quantize_int8(float_onnx: Path, out: Path, recipe: str = "vnni") -> Path:
    """Dynamic int8 quantisation of ``float_onnx``'s linear layers and embeddings (onnxruntime.quantization).

    Weights become int8 once; activations are quantised to uint8 at run time, per tensor. ``recipe``: one
    of :data:`INT8_RECIPES`.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # It advises "pre-processing" through the root logger on every call; that step (quant_pre_process)
    # fails on these graphs here (incomplete symbolic shape inference), so it is not run: silence the advice.
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.WARNING))
    try:
        # Every operator dynamic quantisation supports but convolutions: a ConvBERT's separable convolution
        # ran 3.5x slower as ConvInteger than as float Conv (BENCHMARKS.md, issue 19); BERTs have none.
        ops = sorted(op for op in IntegerOpsRegistry if op != "Conv")
        quantize_dynamic(str(float_onnx), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=ops,
                         **INT8_RECIPES[recipe])  # fmt: skip
    finally:
        logging.disable(previous)
    return out


def agreement(int8: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """How closely a quantised model follows its float model on the same examples: the share of equal
    predictions (classification; None for regression) and the largest logit difference."""
    diff = float(np.max(np.abs(int8.astype(np.float64) - reference))) if int8.size else 0.0
    same = None
    if reference.ndim == 2 and reference.shape[1] > 1 and len(reference):
        same = float(np.mean(int8.argmax(axis=1) == reference.argmax(axis=1)))
    return {"agreement": same, "max_logit_diff": diff, "examples": len(reference)}


@torch.inference_mode()
def saved_logits(
    path: Path, batch: dict[str, torch.Tensor], expected_class: str, remote_code: bool = False
) -> np.ndarray:
    """Logits of the model saved at ``path``, loaded as a user would (the Auto class; with the remote code
    the export ships, when it ships some: what a user without dynaflow runs)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=remote_code).eval()
    if type(model).__name__ != expected_class:
        raise ExportMismatch(f"{path} loads as {type(model).__name__}, not {expected_class}")
    return model(**batch).logits.float().numpy()


def check_close(name: str, got: np.ndarray, want: np.ndarray, atol: float = ATOL) -> float:
    """Max absolute logit difference; raise :class:`ExportMismatch` beyond ``atol``."""
    if got.shape != want.shape:
        raise ExportMismatch(f"{name}: logits of shape {got.shape}, the reference gives {want.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if got.size else 0.0
    if not diff <= atol:
        raise ExportMismatch(f"{name}: logits differ from the reference by {diff:.3g} (> {atol:g})")
    return diff


def check_int8(
    float_onnx: Path, out: Path, dev: TokenizedSplit, min_agreement: float, recipe: str = "vnni"
) -> dict[str, Any]:
    """Quantise ``float_onnx`` into ``out`` and compare the two on ``dev``; raise :class:`ExportMismatch`
    when they agree on fewer than ``min_agreement`` of the predictions."""
    from dynaflow.evaluation.machine import available_cpus
    from dynaflow.evaluation.scoring import predict

    quantize_int8(float_onnx, out, recipe)
    threads = available_cpus()
    int8, reference = (
        predict(onnx_logits_fn(path, threads), dev, INT8_SCORING_BATCH) for path in (out, float_onnx)
    )
    check = agreement(int8, reference) | {"recipe": recipe}
    if check["agreement"] is not None and check["agreement"] < min_agreement:
        raise ExportMismatch(
            f"int8 model {out.name}: predicts as the float model on {check['agreement']:.1%} of "
            f"{check['examples']} dev examples, below evaluate.int8_min_agreement = {min_agreement:.1%}"
        )
    return check


def _arch_cell(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def model_card(info: Mapping[str, Any]) -> str:
    """README.md of an exported candidate: what it is, how good and fast, and how to run it.

    ``info``: the export summary (``title``, ``description``, ``method``, ``candidate``, ``arch``, ``params``,
    ``remote_code``, check diffs) plus optional ``metric``, ``metric_name``, ``task``, ``profile`` (a profile
    dump), ``threads``, ``latency`` (LatencyStats dict), ``memory_mb``, ``budget``, ``machine``, ``source``
    and ``path`` (where the export is published, for the usage snippets).
    """
    metric_name = info.get("metric_name") or "score"
    metric = info.get("metric")
    profile = info.get("profile")
    lat = info.get("latency") or {}
    remote = bool(info.get("remote_code"))
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-classification",
        f"tags: [{info['method']}, dynaflow, text-classification]",
        "---",
        "",
        f"# {info['title']}",
        "",
        info.get("description")
        or f"A {info['method']} model trained with dynaflow on `{info.get('task', '?')}`.",
        "",
        "| | |",
        "|---|---|",
        f"| candidate | `{info['candidate']}` ({info['method']}) |",
        *(f"| {k} | {_arch_cell(v)} |" for k, v in (info.get("arch") or {}).items()),
        f"| parameters | {info['params'] / 1e6:.2f} M |",
        f"| dev {metric_name} | " + (f"{metric:.4f}" if metric is not None else "not measured") + " |",
    ]
    if profile:
        p = profile
        threads = info.get("threads", p["threads"])
        lines.append(
            f"| hardware profile | `{p['name']}`: {p['device']}, {threads} thread(s), "
            f"{p['runtime']}, batch {p['batch_size']}, sequence length {p['seq_len']} |"
        )
    if lat:
        lines.append(
            f"| latency (ms per batch) | median {lat['median_ms']:.3f}, p90 {lat['p90_ms']:.3f} "
            f"({lat['repeats']} timed calls) |"
        )
    if info.get("memory_mb") is not None:
        lines.append(f"| peak memory | {info['memory_mb']:.1f} MiB |")
    if q := info.get("int8"):
        agree = "on" if q["agreement"] is None else f"predicts as the float model on {q['agreement']:.2%} of"
        own = "; the score, latency and memory above are its own" if info.get("precision") == "int8" else ""
        lines.append(
            f"| int8 (`{q['file']}`) | {agree} {q['examples']} dev examples, max abs logit difference "
            f"{q['max_logit_diff']:.3g}{own} |"
        )
    if info.get("budget"):
        lines.append(f"| budget | {info['budget']} |")
    where = info.get("path") or "THIS_DIR"
    if info.get("machine"):
        m = info["machine"]
        lines.append(f"| measured on | {m.get('cpu')}, {m.get('cpus')} CPUs; torch {m.get('torch')}, "
                     f"onnxruntime {m.get('onnxruntime')} |")  # fmt: skip
    trust = ", trust_remote_code=True" if remote else ""
    lines += [
        f"| source model | `{info.get('source', '?')}` |",
        "",
        "Outputs were checked against the reference before export "
        f"(max |Δ logit|: Hugging Face {info.get('diff_hf', float('nan')):.2g}"
        + (f", ONNX {info['diff_onnx']:.2g}" if info.get("diff_onnx") is not None else "")
        + f"; tolerance {ATOL:g}).",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        *(["# with dynaflow installed, trust_remote_code is not needed"] if remote else []),
        f'clf = pipeline("text-classification", model="{where}"{trust})',
        'print(clf("a charming and funny film"))',
        "```",
    ]
    if info.get("onnx"):
        shipped = INT8_FILE if info.get("precision") == "int8" else ONNX_FILE
        lines += [
            "",
            f"ONNX Runtime (`{shipped}`; inputs `input_ids`, `attention_mask`, `token_type_ids`, int64):",
            "",
            "```python",
            "import onnxruntime as ort",
            "from transformers import AutoTokenizer",
            "",
            f'tok = AutoTokenizer.from_pretrained("{where}"{trust})',
            f'session = ort.InferenceSession("{where}/{shipped}")',
            'enc = tok(["a charming and funny film"], return_tensors="np")',
            'logits = session.run(None, {k: enc[k].astype("int64") for k in '
            '("input_ids", "attention_mask", "token_type_ids")})[0]',
            "```",
        ]
    return "\n".join(lines) + "\n"


def export_candidate(
    candidate: Candidate,
    out_dir: Path,
    *,
    tokenizer_dir: Path | None,
    batch: dict[str, torch.Tensor],
    onnx: bool,
    labels: list[str] | None = None,
    card: Mapping[str, Any] | None = None,
    onnx_file: Path | None = None,
    opset: int = 17,
    exporter: str = "torchscript",
    int8_dev: TokenizedSplit | None = None,
    min_agreement: float = 0.95,
    int8_recipe: str = "vnni",
) -> dict[str, Any]:
    """Build ``candidate``, check it, publish it at ``out_dir``; return the summary (also ``export.json``).

    Everything is written to a temporary directory next to ``out_dir``, loaded back and compared with the
    candidate's reference; ``out_dir`` is replaced only when every check passed. ``onnx_file``: an already
    exported (and checked) ONNX file of this candidate to reuse. ``int8_dev``: also ship the int8 model
    (``model.int8.onnx``, beside the float ``model.onnx``), checked on these dev examples: it must predict as
    the float model on at least ``min_agreement`` of them (classification), quantised by ``int8_recipe``
    (:data:`INT8_RECIPES`).
    """
    if int8_dev is not None and not onnx:
        raise ValueError("an int8 export is quantised from the ONNX model: onnx must be true")
    out_dir = Path(out_dir)
    model = candidate.build().eval()
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    want = candidate.reference(batch) if candidate.reference is not None else model_logits(model, batch)
    summary: dict[str, Any] = {
        "candidate": candidate.id,
        "method": candidate.method,
        "name": candidate.name,
        "title": candidate.title or f"{candidate.method} candidate {candidate.name}",
        "description": candidate.description,
        "arch": dict(candidate.arch),
        "params": sum(p.numel() for p in model.parameters()),
        "remote_code": sorted(candidate.remote_code),
        **dict(card or {}),
    }
    with staged_output(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer_dir is not None:  # tokenizer files only, never another model's weights or config
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file() and not (tmp / f.name).exists() and f.suffix not in (".safetensors", ".bin"):
                    shutil.copy2(f, tmp / f.name)
        for name, text in candidate.remote_code.items():
            (tmp / name).write_text(text)
        summary["diff_hf"] = check_close(
            "Hugging Face export",
            saved_logits(tmp, batch, type(model).__name__, bool(candidate.remote_code)),
            want,
        )
        if onnx:
            target = tmp / ONNX_FILE
            if onnx_file is not None:
                shutil.copy2(onnx_file, target)
            else:
                export_onnx(model, target, opset=opset, exporter=exporter)
            summary["diff_onnx"] = check_close("ONNX export", onnx_logits(target, batch), want)
            summary["onnx"] = ONNX_FILE
        if int8_dev is not None:
            check = check_int8(target, tmp / INT8_FILE, int8_dev, min_agreement, int8_recipe)
            summary["int8"] = {"file": INT8_FILE, **check}
        summary["files"] = sorted(p.name for p in tmp.iterdir()) + ["README.md", "export.json"]
        (tmp / "README.md").write_text(model_card(summary))
        (tmp / "export.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    return summary
