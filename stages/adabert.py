"""AdaBERT stages: teacher probes (once), the architecture search, the searched student's retraining, and
the random-search control.

* ``adabert_probes``: the teacher's logits and a linear probe's logits on every teacher layer for every
  training example (:mod:`dynaflow.methods.adabert.distill`); nothing after it runs the teacher.
* ``adabert_search``: a supernet of ``adabert.max_cells`` cells trained on those targets while the
  architecture weights move (after ``arch_warmup_epochs``); writes ``genotype.json``, the architecture
  weights at every epoch end (``arch_history.json``, MLflow) and a heatmap of the final op probabilities.
* ``adabert``: the derived genotype retrained from scratch with the probe distillation; the epoch end best
  on ``adabert_train.selection``'s split is kept.
* ``adabert_random``: ``adabert_train.random_architectures`` random genotypes of the same space retrained
  alike; the best on the held-out rows is the control's candidate, and every one's dev score is recorded
  (the question a user asks: does the search beat the median random architecture?).

A killed search or retraining resumes from its checkpoint in ``work_dir``.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
from pathlib import Path
from typing import Any

from dynaflow.config import AdaBertStudentConfig
from dynaflow.core.artifacts import atomic_write_json
from dynaflow.core.errors import DynaflowError
from dynaflow.core.plots import LOSS_CURVE, curve_records, loss_plot
from dynaflow.core.tracking import NullTracker
from dynaflow.data.splits import TOKENIZER_DIR, load_heldout, load_split, read_task_meta
from stages.registry import Stage, StageContext, extremes, register

log = logging.getLogger(__name__)
TARGETS = "targets.npz"  # adabert_probes: layer_targets [N, L + 1, C] for the training rows, in their order
GENOTYPE = "genotype.json"
ARCH_HISTORY = "arch_history.json"
SEARCHED = "searched"
SUMMARY = "summary.json"  # adabert_random: every architecture's scores and the one chosen


def random_name(i: int) -> str:
    return f"r{i}"


def heldout_or_none(data_dir: Path) -> Any:
    """The held-out training rows, or None when the data stage kept none (``data.heldout_examples: 0``)."""
    from dynaflow.data.splits import HELDOUT

    return load_heldout(data_dir) if (data_dir / f"{HELDOUT}.parquet").is_file() else None


# -- adabert_probes ------------------------------------------------------------------------------------------
def run_probes(ctx: StageContext) -> dict[str, Any]:
    import numpy as np
    from transformers import BertForSequenceClassification

    from dynaflow.core.plots import pyplot
    from dynaflow.data.splits import collate
    from dynaflow.evaluation.metrics import compute_metrics, main_score
    from dynaflow.methods.adabert.distill import probe_logits, teacher_features, train_probes

    p, data_dir = ctx.params, ctx.upstream("data")
    meta = read_task_meta(data_dir)
    teacher = BertForSequenceClassification.from_pretrained(ctx.upstream("teacher")).eval()

    def features(split: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
        from tqdm.auto import tqdm

        feats, logits, size = [], [], p.adabert.eval_batch_size
        for start in tqdm(range(0, len(split), size), desc=f"teacher features ({name})", unit="batch"):
            rows = collate(split, range(start, min(start + size, len(split))))
            f, lg = teacher_features(teacher, rows, p.adabert.probe_pooling)
            feats.append(f.numpy())
            logits.append(lg.numpy())
        return np.concatenate(feats), np.concatenate(logits)

    train, heldout = load_split(data_dir, "train"), heldout_or_none(data_dir)
    train_features, train_logits = features(train, "train")
    weight, bias = train_probes(train_features, train.labels, meta["num_labels"], p.adabert.probe_steps,
                                p.adabert.probe_learning_rate, p.seed)  # fmt: skip
    targets = probe_logits(train_features, weight, bias)
    targets[:, -1] = train_logits  # the last layer's target: the teacher's own classifier
    ctx.out.mkdir(parents=True, exist_ok=True)
    with open(ctx.out / TARGETS, "wb") as f:  # ctx.out is the stage's temporary folder: written whole
        np.savez(f, layer_targets=targets.astype(np.float32))

    # How right each probe is on rows it never saw: the layers the attentive weights will favour.
    scores: dict[str, float] = {}
    if heldout is not None and len(heldout):
        held_features, held_logits = features(heldout, "held-out")
        held = probe_logits(held_features, weight, bias)
        held[:, -1] = held_logits
        for layer in range(held.shape[1]):
            predictions = held[:, layer, 0] if held.shape[2] == 1 else held[:, layer]
            found = compute_metrics(meta["task"], predictions, heldout.labels)
            scores[f"probe.layer{layer}"] = main_score(meta["task"], found)
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(range(held.shape[1]), [scores[f"probe.layer{i}"] for i in range(held.shape[1])], marker="o")
        ax.set_xlabel("teacher layer (0: embeddings; last: the teacher's classifier)")
        ax.set_ylabel(f"held-out {meta['main_metric']}")
        ax.set_title("AdaBERT: a linear probe on each teacher layer", fontsize=10)
        fig.tight_layout()
        fig.savefig(ctx.out / "probes.png", dpi=120)
        plt.close(fig)
        ctx.tracker.log_artifact(ctx.out / "probes.png")
    atomic_write_json(
        ctx.out / "metrics.json", scores | {"examples": len(train), "layers": int(targets.shape[1])}
    )
    ctx.tracker.log_metrics(scores)
    log.info("adabert probes: %s", {k: round(v, 4) for k, v in scores.items()})
    return scores | {"examples": len(train)}


# -- shared by search and retraining -------------------------------------------------------------------------
def student_config(teacher_dir: Path, data_dir: Path, cfg: AdaBertStudentConfig, genotype: Any = None) -> Any:
    """The student's ``AdaBertConfig`` for this teacher and task (vocabulary, embedding shape, labels)."""
    from transformers import AutoConfig, AutoTokenizer

    from dynaflow.methods.adabert.modeling_adabert import AdaBertConfig

    teacher, meta = AutoConfig.from_pretrained(teacher_dir), read_task_meta(data_dir)
    train = load_split(data_dir, "train")
    pairs = any(1 in types for types in train.token_type_ids[:1000])
    return AdaBertConfig(
        vocab_size=teacher.vocab_size,
        embedding_size=teacher.hidden_size,
        max_position_embeddings=teacher.max_position_embeddings,
        type_vocab_size=teacher.type_vocab_size,
        layer_norm_eps=teacher.layer_norm_eps,
        pad_token_id=AutoTokenizer.from_pretrained(data_dir / TOKENIZER_DIR).pad_token_id or 0,
        hidden_size=cfg.hidden_size,
        hidden_dropout_prob=cfg.dropout,
        num_labels=meta["num_labels"],
        sentence_pairs=pairs,
        genotype=genotype,
    )


def freeze_teacher_embeddings(stem: Any, teacher_dir: Path) -> None:
    """The student's embeddings: the fine-tuned teacher's, frozen (as in the paper)."""
    from transformers import BertForSequenceClassification

    source = BertForSequenceClassification.from_pretrained(teacher_dir).bert.embeddings
    stem.embeddings.load_state_dict(
        {k: v for k, v in source.state_dict().items() if not k.endswith(("position_ids", "token_type_ids"))}
    )
    stem.embeddings.requires_grad_(False)


class CachedTargets:
    """The probes stage's targets, looked up by the training rows ``fit`` says the batch holds."""

    def __init__(self, probes_dir: Path) -> None:
        import numpy as np
        import torch

        with np.load(probes_dir / TARGETS) as f:
            self.all = torch.from_numpy(f["layer_targets"])
        self.batch = self.all[:0]

    def before_step(self, step: int, indices: Any) -> None:
        self.batch = self.all[indices]


# -- adabert_search ------------------------------------------------------------------------------------------
def run_search(ctx: StageContext) -> dict[str, Any]:
    import numpy as np
    import torch

    from dynaflow.core.plots import heatmap
    from dynaflow.methods.adabert.distill import student_loss
    from dynaflow.methods.adabert.genotype import derive, describe
    from dynaflow.methods.adabert.modeling_adabert import OPS, PARAMETER_FREE
    from dynaflow.methods.adabert.supernet import AdaBertSupernet, efficiency_loss, op_costs
    from dynaflow.training.loop import TrainConfig, fit

    p, data_dir, teacher_dir = ctx.params, ctx.upstream("data"), ctx.upstream("teacher")
    cfg, search = p.adabert, p.adabert_search
    meta, train = read_task_meta(data_dir), load_split(data_dir, "train")
    torch.manual_seed(p.seed)
    config = student_config(teacher_dir, data_dir, cfg)
    supernet = AdaBertSupernet(config, cfg.max_cells)
    freeze_teacher_embeddings(supernet.stem, teacher_dir)
    targets, costs = CachedTargets(ctx.upstream("adabert_probes")), op_costs(cfg.hidden_size)
    steps_per_epoch = -(-len(train) // search.batch_size)
    total, warmup = steps_per_epoch * search.epochs, steps_per_epoch * search.arch_warmup_epochs
    position = {"step": 0}

    def before_step(step: int, indices: Any) -> None:
        position["step"] = step
        targets.before_step(step, indices)

    def step(batch: dict[str, torch.Tensor], note: Any = None) -> dict[str, float]:
        labels = batch.pop("labels")
        tau = search.tau_max * (search.tau_min / search.tau_max) ** (position["step"] / max(1, total - 1))
        searching = position["step"] >= warmup
        # Before the warm-up ends the architecture weights get no gradient: ops are drawn uniformly.
        op_logits = supernet.op_logits if searching else supernet.op_logits.detach()
        depth_logits = supernet.depth_logits if searching else supernet.depth_logits.detach()
        op_weights = torch.nn.functional.gumbel_softmax(op_logits, tau=tau, hard=True, dim=-1)
        depth_weights = torch.nn.functional.gumbel_softmax(depth_logits, tau=tau, hard=True, dim=-1)
        layer_logits = supernet.layer_logits(
            batch, op_weights, depth_weights, search.single_path, search.every_depth
        )
        loss, parts = student_loss(layer_logits, labels, targets.batch.to(labels.device), cfg.gamma,
                                   cfg.attentive, meta["is_regression"])  # fmt: skip
        efficiency = efficiency_loss(torch.softmax(op_logits, -1), torch.softmax(depth_logits, -1),
                                     costs.to(op_logits.device))  # fmt: skip
        (loss + search.beta * efficiency).backward()
        if note is not None:
            note(f"K={len(layer_logits)} τ={tau:.2f}{'' if searching else ' warm-up'}")
        return {"loss": loss.item(), "efficiency": efficiency.item(), "tau": tau} | parts

    history: list[dict[str, Any]] = []

    def on_epoch_end(epoch: int) -> dict[str, float]:
        ops = torch.softmax(supernet.op_logits.detach(), -1).cpu().numpy()
        depth = torch.softmax(supernet.depth_logits.detach(), -1).cpu().numpy()
        genotype = derive(ops, depth, cfg.parameter_free_cap)
        history.append({"epoch": epoch, "op_probs": ops.round(5).tolist(),
                        "depth_probs": depth.round(5).tolist(), "genotype": genotype})  # fmt: skip
        log.info("adabert search epoch %d: %s", epoch, describe(genotype))
        # Per epoch in MLflow: each op's mean probability over the edges, and each depth's.
        return {f"arch.op.{op}": float(ops[:, j].mean()) for j, op in enumerate(OPS)} | {
            f"arch.depth.{k + 1}": float(v) for k, v in enumerate(depth)
        }

    def history_state() -> tuple[Any, Any]:
        return (lambda: list(history)), (lambda saved: history.extend(saved or []))

    arch = set(supernet.architecture_parameters())
    result = fit(
        supernet, train, step, TrainConfig.from_section(search, p.seed),
        checkpoint=ctx.work / "checkpoint.pt",
        fingerprint=ctx.key, tracker=ctx.tracker, on_epoch_end=on_epoch_end, extra_state=history_state(),
        before_step=before_step, desc="adabert-search", pad_id=config.pad_token_id,
        param_lr={name: search.arch_learning_rate for name, _ in supernet.named_parameters() if name in arch},
    )  # fmt: skip
    final = history[-1]
    genotype, ops = final["genotype"], np.asarray(final["op_probs"])
    ctx.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(ctx.out / GENOTYPE, genotype)
    atomic_write_json(ctx.out / ARCH_HISTORY, history)
    atomic_write_json(ctx.out / LOSS_CURVE, curve_records(result.loss_history))
    edge_names = [f"n{n}<-{'s0 s1 n0 n1'.split()[s]}" for n in range(3) for s in range(2 + n)]
    heatmap(ops, list(OPS), edge_names, "op", "edge (node <- state)",
            f"AdaBERT search: op probabilities after {search.epochs} epochs ({describe(genotype)[:4]})",
            ctx.out / "op_probs.png", annotate=False)  # fmt: skip
    ctx.tracker.log_artifact(ctx.out / GENOTYPE)
    ctx.tracker.log_artifact(ctx.out / "op_probs.png")
    free = sum(op in PARAMETER_FREE for edges in genotype["cell"] for _, op in edges)
    log.info("adabert search: derived %s", describe(genotype))
    return {"depth": genotype["depth"], "parameter_free_edges": free, "genotype": describe(genotype),
            "steps": result.global_step, "search_seconds": result.seconds}  # fmt: skip


# -- adabert, adabert_random: retraining -------------------------------------------------------------------
def retrain(
    ctx: StageContext, genotype: dict[str, Any], name: str, out_dir: Path, tracker: NullTracker
) -> dict[str, Any]:
    """Train ``genotype``'s derived network from scratch with the probe distillation; keep the epoch end best
    on ``adabert_train.selection``'s split; save it as a Hugging Face directory in ``out_dir``."""
    import torch

    from dynaflow.evaluation.scoring import epoch_end_selection, evaluate, hf_logits, load_dev
    from dynaflow.methods.adabert.distill import student_loss
    from dynaflow.methods.adabert.genotype import describe
    from dynaflow.methods.adabert.modeling_adabert import AdaBertForSequenceClassification
    from dynaflow.training.loop import TrainConfig, fit
    from dynaflow.training.selection import BestWeights, selection_split

    p, data_dir, teacher_dir = ctx.params, ctx.upstream("data"), ctx.upstream("teacher")
    cfg, train_cfg = p.adabert, p.adabert_train
    meta, train = read_task_meta(data_dir), load_split(data_dir, "train")
    dev = load_dev(data_dir, meta["dev_splits"])
    torch.manual_seed(p.seed)  # every architecture starts from the same draw of the generator
    student = AdaBertForSequenceClassification(student_config(teacher_dir, data_dir, cfg, genotype))
    freeze_teacher_embeddings(student.stem, teacher_dir)
    targets = CachedTargets(ctx.upstream("adabert_probes"))

    def step(batch: dict[str, torch.Tensor], note: Any = None) -> dict[str, float]:
        labels = batch.pop("labels")
        loss, parts = student_loss(student.layer_logits(**batch), labels, targets.batch.to(labels.device),
                                   cfg.gamma, cfg.attentive, meta["is_regression"])  # fmt: skip
        loss.backward()
        return {"loss": loss.item()} | parts

    steps_per_epoch = -(-len(train) // train_cfg.batch_size)
    best = BestWeights(student)
    chooser = selection_split(train_cfg.selection, data_dir, dev)
    on_epoch_end = epoch_end_selection(
        student, meta["task"], dev, chooser, best, steps_per_epoch, cfg.eval_batch_size, f"adabert {name}"
    )
    result = fit(
        student, train, step, TrainConfig.from_section(train_cfg, p.seed),
        checkpoint=ctx.work / name / "checkpoint.pt",
        fingerprint=f"{ctx.key}:{name}", tracker=tracker, on_epoch_end=on_epoch_end,
        extra_state=best.checkpoint_state, before_step=targets.before_step, desc=f"adabert-{name}",
        pad_id=student.config.pad_token_id,
    )  # fmt: skip
    selected_step = best.restore() or result.global_step
    student = student.cpu().eval()
    dev_metrics = evaluate(hf_logits(student), meta["task"], dev, cfg.eval_batch_size)
    heldout = heldout_or_none(data_dir)
    held_score = (
        None if heldout is None
        else evaluate(hf_logits(student), meta["task"], {"heldout": heldout}, cfg.eval_batch_size)["score"]
    )  # fmt: skip
    student.save_pretrained(out_dir, safe_serialization=True)
    shutil.copytree(data_dir / TOKENIZER_DIR, out_dir, dirs_exist_ok=True)
    metrics = dev_metrics | {
        "heldout_score": held_score,
        "depth": genotype["depth"],
        "genotype": describe(genotype),
        "parameters": sum(q.numel() for q in student.parameters()),
        "trained_parameters": sum(
            q.numel() for n, q in student.named_parameters() if ".embeddings." not in n
        ),
        "steps": result.global_step,
        "selected_step": selected_step,
    }
    atomic_write_json(out_dir / "metrics.json", metrics)
    atomic_write_json(out_dir / LOSS_CURVE, curve_records(result.loss_history))
    tracker.log_metrics({f"final.{name}.dev.{k}": v for k, v in dev_metrics.items()})
    log.info("adabert %s (%s): dev %.4f", name, describe(genotype), metrics["score"])
    return metrics | {"train_seconds": result.seconds}


def run_searched(ctx: StageContext) -> dict[str, Any]:
    from dynaflow.methods.adabert.genotype import validate

    path = ctx.upstream("adabert_search") / GENOTYPE
    try:
        genotype = validate(json.loads(path.read_text()), ctx.params.adabert.max_cells)
    except (ValueError, TypeError) as exc:  # a hand-edited file: one message naming it, no traceback
        raise DynaflowError(f"{path}: {exc}") from None
    found = retrain(ctx, genotype, SEARCHED, ctx.out / SEARCHED, ctx.tracker)
    return {f"{SEARCHED}.{k}": v for k, v in found.items()}


def run_random(ctx: StageContext) -> dict[str, Any]:
    import numpy as np

    from dynaflow.methods.adabert.genotype import random_genotype

    p, n = ctx.params, ctx.params.adabert_train.random_architectures
    rng = np.random.default_rng([p.seed, 1])  # its own stream: the search's seed does not pick them
    genotypes = [random_genotype(rng, p.adabert.max_cells, p.adabert.parameter_free_cap) for _ in range(n)]
    found = {}
    for i, genotype in enumerate(genotypes):
        name = random_name(i)
        found[name] = retrain(
            ctx, genotype, name, ctx.out / name, ctx.tracker.child(f"adabert random {name}")
        )
    ranked = [name for name in found if found[name]["heldout_score"] is not None] or list(found)
    best = max(ranked, key=lambda name: found[name]["heldout_score"] or found[name]["score"])
    dev_scores = [found[name]["score"] for name in found]
    summary = {"chosen": best, "of": n, "dev_median": statistics.median(dev_scores),
               "architectures": {name: {k: m[k] for k in ("score", "heldout_score", "genotype", "parameters")}
                                 for name, m in found.items()}}  # fmt: skip
    atomic_write_json(ctx.out / SUMMARY, summary)
    # The chosen student's metrics also say how many it was chosen from (retrain wrote the rest).
    chosen = {k: v for k, v in found[best].items() if k != "train_seconds"}
    atomic_write_json(ctx.out / best / "metrics.json", chosen | {"of": n})
    metrics = {f"{name}.{k}": v for name, m in found.items() for k, v in m.items()}
    return metrics | {"chosen": best, "dev_median": summary["dev_median"]}


def _searched_headline(metrics: dict[str, Any]) -> dict[str, Any]:
    return extremes([metrics[f"{SEARCHED}.score"]]) | {"seconds": metrics[f"{SEARCHED}.train_seconds"]}


def _random_headline(metrics: dict[str, Any]) -> dict[str, Any]:
    names = [k.removesuffix(".depth") for k in metrics if k.endswith(".depth")]
    return extremes([metrics[f"{n}.score"] for n in names]) | {
        "seconds": sum(metrics[f"{n}.train_seconds"] for n in names)
    }


def chosen_random(out: Path) -> str:
    """The random control's candidate (best on held-out rows), from ``adabert_random``'s summary."""
    return json.loads((out / SUMMARY).read_text())["chosen"]


STUDENT_SECTIONS = ("adabert", "seed")
register(
    Stage(
        name="adabert_probes",
        out="artifacts/adabert-probes",
        sections=STUDENT_SECTIONS,
        upstream=("data", "teacher"),
        run=run_probes,
        flow="adabert",
        headline=lambda m: {"examples": m["examples"]},
        description="AdaBERT: the teacher's logits and a probe's on every layer, for every training row",
    )
)
register(
    Stage(
        name="adabert_search",
        out="artifacts/adabert-search",
        sections=(*STUDENT_SECTIONS, "adabert_search"),
        upstream=("data", "teacher", "adabert_probes"),
        run=run_search,
        flow="adabert",
        plots=lambda p: {LOSS_CURVE: loss_plot("AdaBERT search: training loss")[LOSS_CURVE]},
        headline=lambda m: {"seconds": m["search_seconds"]},
        description="AdaBERT: differentiable search of cells and depth (Gumbel-softmax, probe distillation)",
    )
)
register(
    Stage(
        name="adabert",
        out="artifacts/adabert",
        sections=(*STUDENT_SECTIONS, "adabert_train"),
        upstream=("data", "teacher", "adabert_probes", "adabert_search"),
        run=run_searched,
        flow="adabert",
        plots=lambda p: {
            f"{SEARCHED}/{LOSS_CURVE}": loss_plot("AdaBERT searched student: training loss")[LOSS_CURVE]
        },
        headline=_searched_headline,
        description="AdaBERT: the searched genotype retrained from scratch with probe distillation",
    )
)
register(
    Stage(
        name="adabert_random",
        out="artifacts/adabert-random",
        sections=(*STUDENT_SECTIONS, "adabert_train"),
        upstream=("data", "teacher", "adabert_probes"),
        run=run_random,
        flow="adabert",
        headline=_random_headline,
        description="AdaBERT's control: random genotypes of the same space, retrained alike",
    )
)
