"""One stage against two, paired (issue 15): each token-gated model against each PoWER-BERT model, on the
same dev examples, after ``bench/gates.py`` trained them in PROJECT.

    GLUE_DIR=../shared/data/glue python bench/paired.py --project PROJECT --out bench/paired.json

Each pair's dev-score gap (gates minus PoWER-BERT) with a 95% paired-bootstrap interval
(:mod:`dynaflow.evaluation.paired`, 2,000 resamples of the dev examples). The FLOPs columns say which of the
two is cheaper: "the one stage at least matches PoWER-BERT at equal FLOPs" holds where a gated model at least
as cheap as a PoWER-BERT model has an interval that reaches 0 or above it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common import project_main

OUT = "artifacts/gates-bench"  # where bench/gates.py keeps its models


def dev_predictions(model_dir: Path, dev: Any) -> Any:
    """The hard-gated model's dev logits (regression: scores), tokens really dropped."""
    from dynaflow.evaluation.scoring import hf_logits, predict
    from dynaflow.methods.gates.modeling_gated_bert import GatedBertForSequenceClassification

    model = GatedBertForSequenceClassification.from_pretrained(model_dir).eval()
    model.config.hard_gates = True
    logits = predict(hf_logits(model), dev)
    return logits[:, 0] if logits.shape[1] == 1 else logits


def run(args: Any) -> dict[str, Any]:
    import numpy as np

    from dynaflow.config import load_params
    from dynaflow.data.splits import read_task_meta
    from dynaflow.evaluation.metrics import compute_metrics, main_score
    from dynaflow.evaluation.paired import paired_bootstrap
    from dynaflow.evaluation.scoring import load_dev
    from stages.gates import run_name
    from stages.registry import Layout

    root = args.project.resolve()
    params = load_params(root / "params.yaml", args.set)
    data_dir = Layout(root).out("data")
    meta = read_task_meta(data_dir)
    dev = next(iter(load_dev(data_dir, meta["dev_splits"]).values()))
    labels = np.asarray(dev.labels)
    models: dict[str, dict[str, Any]] = {}
    for family in ("gates", "powerbert"):
        for lam in getattr(params, family).lambdas:
            where = root / OUT / family / run_name(lam)
            if not (where / "metrics.json").is_file():
                raise SystemExit(f"{where}: not trained; run bench/gates.py --project {args.project} first")
            info = json.loads((where / "metrics.json").read_text())
            predictions = dev_predictions(where, dev)
            again = main_score(meta["task"], compute_metrics(meta["task"], predictions, labels))
            if abs(again - info["score"]) > 1e-4:  # then these are not the predictions its score came from
                raise SystemExit(f"{where}: dev score {again:.4f} here, {info['score']:.4f} in metrics.json")
            models[f"{family}/{run_name(lam)}"] = {"family": family, "score": info["score"],
                                                   "flops_reduction": info["flops_reduction"],
                                                   "predictions": predictions}  # fmt: skip
    pairs = []
    for g_name, g in models.items():
        for p_name, p in models.items():
            if g["family"] != "gates" or p["family"] != "powerbert":
                continue
            gap = paired_bootstrap(meta["task"], g["predictions"], p["predictions"], labels, seed=params.seed)
            pairs.append({"gates": g_name, "powerbert": p_name, "gates_reduction": g["flops_reduction"],
                          "powerbert_reduction": p["flops_reduction"], "gates_score": g["score"],
                          "powerbert_score": p["score"], **gap.as_dict()})  # fmt: skip
    return {"project": str(root), "task": meta["task"], "metric": meta["main_metric"],
            "dev_examples": len(labels), "pairs": pairs}  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    lines = [f"{result['task']}, {result['dev_examples']} dev examples, {result['metric']} (points):", "",
             "| gated | fewer FLOPs | PoWER-BERT | fewer FLOPs | gap (gates − PoWER-BERT) | 95% interval "
             "| resamples gates not above |", "|---|---:|---|---:|---:|---|---:|"]  # fmt: skip
    for p in result["pairs"]:
        lines.append(
            f"| {p['gates']} | {p['gates_reduction']:.2f}x "
            f"| {p['powerbert']} | {p['powerbert_reduction']:.2f}x "
            f"| {p['difference'] * 100:+.2f} | {p['low'] * 100:+.2f} to {p['high'] * 100:+.2f} "
            f"| {p['share_not_above']:.1%} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    project_main(__doc__, run, markdown)
