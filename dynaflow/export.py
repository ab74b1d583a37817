"""Export a sub-network as a deployable artifact, checked against the elastic model before it is published.

* Hugging Face directory: the physically extracted sub-network (``save_pretrained``), the tokenizer, a model
  card (``README.md``) and ``modeling_elastic_bert.py``, so ``AutoModelForSequenceClassification`` and
  ``transformers.pipeline`` open it with ``trust_remote_code=True`` where dynaflow is not installed (after
  ``import dynaflow.modeling`` no remote code is needed).
* ONNX (``model.onnx``): inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64,
  ``[batch, sequence]``, both dynamic), output ``logits``.

Before anything is published the saved files are loaded back and their logits compared with the elastic
model's at the same width and depth on a real dev batch (padding included); beyond ``atol`` (1e-4) the
export fails with :class:`ExportMismatch`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynaflow.artifacts import staged_output
from dynaflow.modeling import ElasticBertForSequenceClassification

ATOL = 1e-4
REMOTE_CODE = "modeling_elastic_bert.py"
ONNX_FILE = "model.onnx"
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
    """An exported artifact does not reproduce the elastic model's logits."""


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
    model: ElasticBertForSequenceClassification,
    path: Path,
    opset: int = 17,
    exporter: str = "torchscript",
) -> Path:
    """Write ``model`` (an extracted sub-network, on CPU) as ONNX with dynamic batch and sequence axes."""
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
        from dynaflow.data import collate, load_split, read_task_meta

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
def elastic_logits(
    model: ElasticBertForSequenceClassification, width: float, depth: float, batch: dict[str, torch.Tensor]
) -> np.ndarray:
    was_training = model.training
    model.eval()
    out = model(**batch, width_mult=width, depth_mult=depth).logits.float().cpu().numpy()
    model.train(was_training)
    return out


def onnx_logits(path: Path, batch: dict[str, torch.Tensor]) -> np.ndarray:
    from dynaflow.hardware import ort_runner, ort_session

    inputs = {k: v.numpy().astype(np.int64) for k, v in batch.items()}
    return ort_runner(ort_session(path, threads=1), inputs)()


@torch.inference_mode()
def hf_dir_logits(path: Path, batch: dict[str, torch.Tensor]) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    if not isinstance(model, ElasticBertForSequenceClassification):
        raise ExportMismatch(
            f"{path} loads as {type(model).__name__}, not ElasticBertForSequenceClassification"
        )
    return model(**batch).logits.float().numpy()


def check_close(name: str, got: np.ndarray, want: np.ndarray, atol: float = ATOL) -> float:
    """Max absolute logit difference; raise :class:`ExportMismatch` beyond ``atol``."""
    if got.shape != want.shape:
        raise ExportMismatch(f"{name}: logits of shape {got.shape}, the elastic model gives {want.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if got.size else 0.0
    if not diff <= atol:
        raise ExportMismatch(f"{name}: logits differ from the elastic model's by {diff:.3g} (> {atol:g})")
    return diff


def remote_code() -> str:
    """``dynaflow/modeling.py`` for ``trust_remote_code``, without registering itself with the Auto classes.

    Loaded as remote code, transformers maps the classes through ``config.auto_map``; registering them too
    would re-point ``elastic_bert`` to the remote copy in a process that also imports dynaflow.
    """
    import dynaflow.modeling as source

    text = Path(source.__file__).read_text()
    return text.replace(
        "\n_register_auto()\n", "\n# Loaded as remote code: transformers maps the classes via auto_map.\n"
    )


def model_card(info: Mapping[str, Any]) -> str:
    """README.md of an exported sub-network: what it is, how good and fast, and how to run it.

    ``info``: the export summary plus optional ``metric``, ``metric_name``, ``task``, ``profile`` (a
    profile dump), ``threads``, ``latency`` (LatencyStats dict), ``memory_mb``, ``budget``, ``machine``,
    ``source`` and ``path`` (where the export is published, for the usage snippets).
    """
    w, d = info["width"], info["depth"]
    metric_name = info.get("metric_name") or "score"
    metric = info.get("metric")
    profile = info.get("profile")
    lat = info.get("latency") or {}
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-classification",
        "tags: [dynabert, dynaflow, bert, text-classification]",
        "---",
        "",
        f"# DynaBERT sub-network: width {w:g}, depth {d:g}",
        "",
        f"A physically smaller BERT cut out of a DynaBERT model trained with dynaflow on "
        f"`{info.get('task', '?')}`: {info['layers']} layer(s) (source layers {info.get('source_layers')}), "
        f"{info['heads']} attention heads and {info['intermediate']} FFN neurons per layer.",
        "",
        "| | |",
        "|---|---|",
        f"| width multiplier | {w:g} |",
        f"| depth multiplier | {d:g} |",
        f"| layers / heads / FFN | {info['layers']} / {info['heads']} / {info['intermediate']} |",
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
    if info.get("budget"):
        lines.append(f"| budget | {info['budget']} |")
    where = info.get("path") or "THIS_DIR"
    if info.get("machine"):
        m = info["machine"]
        lines.append(f"| measured on | {m.get('cpu')}, {m.get('cpus')} CPUs; torch {m.get('torch')}, "
                     f"onnxruntime {m.get('onnxruntime')} |")  # fmt: skip
    lines += [
        f"| source model | `{info.get('source', '?')}` |",
        "",
        "Outputs were checked against the elastic model at this width and depth before export "
        f"(max |Δ logit|: Hugging Face {info.get('diff_hf', float('nan')):.2g}"
        + (f", ONNX {info['diff_onnx']:.2g}" if info.get("diff_onnx") is not None else "")
        + f"; tolerance {ATOL:g}).",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        "# with dynaflow installed: import dynaflow.modeling  (then trust_remote_code is not needed)",
        f'clf = pipeline("text-classification", model="{where}", trust_remote_code=True)',
        'print(clf("a charming and funny film"))',
        "```",
    ]
    if info.get("onnx"):
        lines += [
            "",
            "ONNX Runtime (`model.onnx`; inputs `input_ids`, `attention_mask`, `token_type_ids`, int64):",
            "",
            "```python",
            "import onnxruntime as ort",
            "from transformers import AutoTokenizer",
            "",
            f'tok = AutoTokenizer.from_pretrained("{where}")',
            f'session = ort.InferenceSession("{where}/model.onnx")',
            'enc = tok(["a charming and funny film"], return_tensors="np")',
            'logits = session.run(None, {k: enc[k].astype("int64") for k in '
            '("input_ids", "attention_mask", "token_type_ids")})[0]',
            "```",
        ]
    return "\n".join(lines) + "\n"


def write_export(
    model: ElasticBertForSequenceClassification,
    width: float,
    depth: float,
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
) -> dict[str, Any]:
    """Extract (``width``, ``depth``) from the elastic ``model``, check it, publish it at ``out_dir``.

    Everything is written to a temporary directory next to ``out_dir``, loaded back and compared with the
    elastic model; ``out_dir`` is replaced only when every check passed. ``onnx_file``: an already exported
    (and checked) ONNX file of this sub-network to reuse. Returns the export's summary (also
    ``export.json``).
    """
    from dynaflow.extract import count_parameters, extract_subnetwork

    out_dir = Path(out_dir)
    sub = extract_subnetwork(model, width, depth).eval()
    if labels:
        sub.config.id2label = dict(enumerate(labels))
        sub.config.label2id = {name: i for i, name in enumerate(labels)}
    sub.config.auto_map = {
        "AutoConfig": f"{REMOTE_CODE[:-3]}.ElasticBertConfig",
        "AutoModelForSequenceClassification": f"{REMOTE_CODE[:-3]}.ElasticBertForSequenceClassification",
    }
    want = elastic_logits(model, width, depth, batch)
    shape = model.subnet_shape(width, depth)
    summary: dict[str, Any] = {
        "width": width,
        "depth": depth,
        "layers": len(shape.layers),
        "heads": shape.heads[0],
        "intermediate": shape.intermediate[0],
        "source_layers": sub.config.extracted_subnet["source_layers"],
        "params": count_parameters(sub),
        **dict(card or {}),
    }
    with staged_output(out_dir) as tmp:
        sub.save_pretrained(tmp, safe_serialization=True)
        if tokenizer_dir is not None:  # tokenizer files only, never another model's weights or config
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file() and not (tmp / f.name).exists() and f.suffix not in (".safetensors", ".bin"):
                    shutil.copy2(f, tmp / f.name)
        (tmp / REMOTE_CODE).write_text(remote_code())
        summary["diff_hf"] = check_close("Hugging Face export", hf_dir_logits(tmp, batch), want)
        if onnx:
            target = tmp / ONNX_FILE
            if onnx_file is not None:
                shutil.copy2(onnx_file, target)
            else:
                export_onnx(sub, target, opset=opset, exporter=exporter)
            summary["diff_onnx"] = check_close("ONNX export", onnx_logits(target, batch), want)
            summary["onnx"] = ONNX_FILE
        summary["files"] = sorted(p.name for p in tmp.iterdir()) + ["README.md", "export.json"]
        (tmp / "README.md").write_text(model_card(summary))
        (tmp / "export.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    return summary
