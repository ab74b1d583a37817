"""One stage against two, paired (issue 15): each token-gated model against each PoWER-BERT model, on the
same dev examples, after ``bench/gates.py`` trained them in PROJECT.

    GLUE_DIR=../shared/data/glue python bench/paired.py --project PROJECT --out bench/paired.json

Each pair's dev-score gap (gates minus PoWER-BERT) with a 95% paired-bootstrap interval
(:mod:`dynaflow.evaluation.paired`, 2,000 resamples of the dev examples). The encoder GFLOPs per dev example
(inputs unpadded) say which of the two is cheaper: "the one stage at least matches PoWER-BERT at equal
FLOPs" holds where a gated model at least as cheap as a PoWER-BERT model has an interval that reaches 0 or
above it.

When ``gates_dynabert.lambdas`` holds 0, each gated DynaBERT cell is also paired with its λ = 0 twin: the
same cell distilled from the same model (``gates_dynabert.distil_from``) for as many steps with no cost on
tokens. A gated cell that beats the cell it was cut from may owe that to the extra distillation, not to the
gates; the twin tells which.

Each gated DynaBERT cell (λ > 0) is also paired with DynaBERT's own answer at its compute: the most accurate
plain grid point with no more encoder FLOPs per dev example. A gated cell on a Pareto front by a dev
example or two over that neighbour is there by a point estimate; this pair says how far the gap is from 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common import project_main

OUT = "artifacts/gates-bench"  # where bench/gates.py keeps its models


def predictions(model: Any, dev: Any) -> Any:
    """``model``'s dev logits (regression: its scores)."""
    from dynaflow.evaluation.scoring import hf_logits, predict

    logits = predict(hf_logits(model), dev)
    return logits[:, 0] if logits.shape[1] == 1 else logits


def dev_predictions(model_dir: Path, dev: Any) -> Any:
    """The hard-gated model's dev predictions, tokens really dropped, built as the harness builds the
    candidate."""
    from dynaflow.methods.gates.candidates import gated_model

    return predictions(gated_model(model_dir).build(), dev)


def grid_points(root: Path, params: Any, dev: Any) -> list[dict[str, Any]]:
    """Every plain DynaBERT grid point cut from the project's depth_kd model: its dev logits and encoder
    GFLOPs per dev example (the inputs unpadded, as the gated models' FLOPs are counted)."""
    from dynaflow.methods.dynabert.candidates import extracted, point_name
    from dynaflow.methods.gates.budget import all_kept, token_budget
    from dynaflow.models.backbone import load_elastic
    from stages.registry import Layout

    dynabert = load_elastic(Layout(root).out("depth_kd")).eval()
    lengths = [len(ids) for ids in dev.input_ids]
    points = []
    for width in params.widths:
        for depth in params.depths:
            sub = extracted(dynabert, width, depth)
            keep = all_kept(sub.config.num_hidden_layers, max(lengths))
            points.append({"name": f"dynabert/{point_name(width, depth)}",
                           "gflops": token_budget(sub.config, keep, lengths)["gflops_per_example"],
                           "predictions": predictions(sub, dev)})  # fmt: skip
    return points


def run(args: Any) -> dict[str, Any]:
    import numpy as np

    from dynaflow.config import load_params
    from dynaflow.data.splits import read_task_meta
    from dynaflow.evaluation.metrics import compute_metrics, main_score
    from dynaflow.evaluation.paired import paired_bootstrap
    from dynaflow.evaluation.scoring import load_dev
    from stages.gates import run_name
    from stages.gates_dynabert import cell_run_name
    from stages.registry import Layout

    root = args.project.resolve()
    params = load_params(root / "params.yaml", args.set)
    data_dir = Layout(root).out("data")
    meta = read_task_meta(data_dir)
    dev = next(iter(load_dev(data_dir, meta["dev_splits"]).values()))
    labels = np.asarray(dev.labels)

    def model(where: Path) -> dict[str, Any]:
        if not (where / "metrics.json").is_file():
            raise SystemExit(f"{where}: not trained; run bench/gates.py --project {args.project} first")
        info = json.loads((where / "metrics.json").read_text())
        predictions = dev_predictions(where, dev)
        again = main_score(meta["task"], compute_metrics(meta["task"], predictions, labels))
        if abs(again - info["score"]) > 1e-4:  # then these are not the predictions its score came from
            raise SystemExit(f"{where}: dev score {again:.4f} here, {info['score']:.4f} in metrics.json")
        return {"name": f"{where.parent.name}/{where.name}", "score": info["score"],
                "gflops": info["gflops_per_example"], "predictions": predictions}  # fmt: skip

    def paired(a: dict[str, Any], b: dict[str, Any], kind: str) -> dict[str, Any]:
        gap = paired_bootstrap(meta["task"], a["predictions"], b["predictions"], labels, seed=params.seed)
        return {"kind": kind, "a": a["name"], "b": b["name"], "a_gflops": a["gflops"],
                "b_gflops": b["gflops"], "a_score": a["score"], "b_score": b["score"],
                **gap.as_dict()}  # fmt: skip

    gated = [model(root / OUT / "gates" / run_name(lam)) for lam in params.gates.lambdas]
    power = [model(root / OUT / "powerbert" / run_name(lam)) for lam in params.powerbert.lambdas]
    pairs = [paired(g, p, "gates vs PoWER-BERT") for g in gated for p in power]
    cells, where = params.gates_dynabert, root / OUT / "gates_dynabert"
    trained_dynabert = (Layout(root).out("depth_kd") / "config.json").is_file()  # else no cells (gates.py)
    gated_cells = {(cell, lam): model(where / cell_run_name(cell, lam, cells.distil_from))
                   for cell in cells.subnetworks for lam in cells.lambdas if trained_dynabert}  # fmt: skip
    for (cell, lam), gated_cell in gated_cells.items():
        if lam > 0 and (cell, 0.0) in gated_cells:  # λ = 0: the same extra distillation with tokens free
            pairs.append(paired(gated_cell, gated_cells[cell, 0.0], "gated cell vs its λ = 0 twin"))
    grid = grid_points(root, params, dev) if gated_cells else []
    for point in grid:
        point["score"] = main_score(meta["task"], compute_metrics(meta["task"], point["predictions"], labels))
    for (_, lam), gated_cell in gated_cells.items():
        cheaper = [point for point in grid if point["gflops"] <= gated_cell["gflops"]]
        if lam > 0 and cheaper:
            rival = max(cheaper, key=lambda point: point["score"])
            pairs.append(paired(gated_cell, rival, "gated cell vs DynaBERT's best at no more FLOPs"))
    return {"project": str(root), "task": meta["task"], "metric": meta["main_metric"],
            "dev_examples": len(labels), "pairs": pairs}  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    lines = [f"{result['task']}, {result['dev_examples']} dev examples, {result['metric']} (points):", "",
             "| model a | GFLOPs per example | model b | GFLOPs per example | gap (a − b) | 95% interval "
             "| resamples a not above b |", "|---|---:|---|---:|---:|---|---:|"]  # fmt: skip
    for p in result["pairs"]:
        lines.append(
            f"| {p['a']} | {p['a_gflops']:.3f} | {p['b']} | {p['b_gflops']:.3f} "
            f"| {p['difference'] * 100:+.2f} | {p['low'] * 100:+.2f} to {p['high'] * 100:+.2f} "
            f"| {p['share_not_above']:.1%} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    project_main(__doc__, run, markdown)
