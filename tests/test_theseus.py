"""BERT-of-Theseus: module replacing, schedulers, freezing, export to plain HF, the stage and its flow."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertForSequenceClassification

from dynaflow.config import ConfigError, Params, TheseusConfig, load_params
from dynaflow.core.tracking import NullTracker
from dynaflow.methods.theseus.model import (
    ReplacingSchedule,
    build_theseus,
    check_backbone,
    draw_gates,
    export_successor,
    theseus_encoder,
)
from dynaflow.training.loop import make_optimizer
from stages import STAGES, Layout, flow_stages, run_stage
from stages import theseus as theseus_stage
from tests.conftest import make_tiny_backbone, tiny_params
from tests.test_teacher import prepare, run_teacher


@pytest.fixture(scope="module")
def predecessor(tmp_path_factory: pytest.TempPathFactory) -> BertForSequenceClassification:
    """A 4-layer tiny BERT classifier (dropout on): with r = 2 the successor has 2 layers."""
    path = make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert-4"), layers=4)
    torch.manual_seed(0)
    return BertForSequenceClassification.from_pretrained(path, num_labels=2)


def theseus_of(predecessor: BertForSequenceClassification) -> BertForSequenceClassification:
    model = build_theseus(copy.deepcopy(predecessor), compress_ratio=2)
    with torch.no_grad():  # make the successor layers differ from the predecessor layers they copy
        for p in theseus_encoder(model).scc_layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 30, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = mask[3, 4:] = 0  # padded examples
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def train_logits(model: torch.nn.Module) -> torch.Tensor:
    model.train()
    torch.manual_seed(11)  # same dropout masks for the same sequence of layers
    return model(**batch()).logits


def test_rate_0_trains_the_predecessor_and_rate_1_the_successor(predecessor) -> None:
    model = theseus_of(predecessor)
    encoder = theseus_encoder(model)
    encoder.gates = draw_gates(0.0, 2, seed=1, step=5)
    assert encoder.gates == [False, False]
    torch.testing.assert_close(train_logits(model), train_logits(predecessor), rtol=0, atol=1e-6)

    encoder.gates = draw_gates(1.0, 2, seed=1, step=5)
    assert encoder.gates == [True, True]
    successor = export_successor(model)
    torch.testing.assert_close(train_logits(model), train_logits(successor), rtol=0, atol=1e-6)
    assert not torch.allclose(train_logits(successor), train_logits(predecessor), atol=1e-3)

    # Mixed: module 0 replaced by successor layer 0, module 1 kept (predecessor layers 2 and 3).
    encoder.gates = [True, False]
    assert encoder.active_layers() == [encoder.scc_layer[0], encoder.layer[2], encoder.layer[3]]
    model.eval()  # eval: the successor alone, whatever the gates
    assert encoder.active_layers() == list(encoder.scc_layer)
    encoder.gates = None
    model.train()
    with pytest.raises(RuntimeError, match="gates"):
        model(**batch())


def test_gates_are_independent_per_module_and_a_function_of_seed_and_step() -> None:
    draws = [draw_gates(0.5, 6, seed=7, step=t) for t in range(400)]
    assert draws == [draw_gates(0.5, 6, seed=7, step=t) for t in range(400)]  # pure: resume is exact
    assert draws != [draw_gates(0.5, 6, seed=8, step=t) for t in range(400)]
    per_module = [sum(d[i] for d in draws) / len(draws) for i in range(6)]
    assert all(0.4 < f < 0.6 for f in per_module), per_module
    assert sum(len(set(d)) == 2 for d in draws) > 300  # not one shared gate for all modules (TF-port bug)


def test_linear_scheduler() -> None:
    linear = ReplacingSchedule("linear", 0.3, k=0.1)
    assert [round(linear(t), 6) for t in (0, 1, 3, 6, 7, 100)] == [0.3, 0.4, 0.6, 0.9, 1.0, 1.0]
    assert ReplacingSchedule("linear", 0.3, k=0.1, end=2)(2) == 1.0  # successor-only phase
    assert ReplacingSchedule("linear", 0.3, k=0.0006)(1000) == pytest.approx(0.9)  # official README


def test_constant_scheduler_with_and_without_steps_for_replacing() -> None:
    never = ReplacingSchedule("constant", 0.5)  # None: never jumps to 1 (the official default 0 would)
    assert [never(t) for t in (0, 1, 10**6)] == [0.5, 0.5, 0.5]
    at_10 = ReplacingSchedule("constant", 0.5, steps_for_replacing=10)
    assert [at_10(t) for t in (0, 9, 10, 11)] == [0.5, 0.5, 1.0, 1.0]
    assert ReplacingSchedule("constant", 0.5, end=3)(3) == 1.0


def test_stage_schedule_reaches_1_when_the_replacing_epochs_end() -> None:
    cfg = TheseusConfig(epochs=2, finetune_epochs=1, replacing_rate=0.3)
    schedule = theseus_stage.make_schedule(cfg, steps_per_epoch=35)
    assert schedule(0) == 0.3 and schedule(69) < 1.0 and schedule(70) == 1.0 and schedule.end == 70
    explicit = theseus_stage.make_schedule(TheseusConfig(k=0.001, epochs=1), steps_per_epoch=35)
    assert explicit(34) == pytest.approx(0.334) and explicit(35) == 1.0


@pytest.mark.parametrize(
    "section, fragment",
    [
        ({"steps_for_replacing": 100}, "steps_for_replacing is for scheduler 'constant'"),
        ({"scheduler": "constant", "k": 0.001}, "k is for scheduler 'linear'"),
        ({"scheduler": "constant", "steps_for_replacing": 0}, "theseus.steps_for_replacing = 0"),
        ({"replacing_rate": 1.5}, "theseus.replacing_rate = 1.5"),
        ({"compress_ratio": 1}, "theseus.compress_ratio = 1"),
        ({"scheduler": "cosine"}, "theseus.scheduler = 'cosine'"),
    ],
)
def test_config_validation(tmp_path: Path, section: dict, fragment: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps({"theseus": section}))
    with pytest.raises(ConfigError, match="theseus") as info:
        load_params(path)
    assert fragment in str(info.value)


def test_compress_ratio_must_divide_the_backbone(tmp_path: Path, tiny_backbone: Path) -> None:
    params = Params.model_validate({"backbone": str(tiny_backbone), "theseus": {"compress_ratio": 3}})
    with pytest.raises(ConfigError, match=r"does not divide the predecessor's 2 layers \(allowed: \[2\]\)"):
        check_backbone(params)
    check_backbone(Params.model_validate({"backbone": str(tiny_backbone)}))


def test_only_successor_parameters_change_in_a_step(predecessor) -> None:
    model = theseus_of(predecessor)
    encoder = theseus_encoder(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("bert.encoder.scc_layer.") for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model, 1e-2, 0.01)  # what fit builds: requires_grad parameters only
    encoder.gates = [True, False]  # successor layer 0 under predecessor layers 2 and 3
    model.train()
    out = model(**batch(), labels=torch.tensor([0, 1, 1, 0]))
    out.loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    # Layer 0 learnt through the frozen predecessor layers above it; layer 1 was not in the forward.
    assert changed and all(k.startswith("bert.encoder.scc_layer.0.") for k in changed), changed
    assert "bert.encoder.scc_layer.0.output.dense.weight" in changed


def test_export_loads_with_plain_transformers(predecessor, tmp_path: Path) -> None:
    model = theseus_of(predecessor).eval()
    export_successor(model).save_pretrained(tmp_path)
    loaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 2 and len(loaded.bert.encoder.layer) == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch()).logits, model(**batch()).logits, rtol=0, atol=1e-6)
    assert not any("scc" in k for k in load_file(tmp_path / "model.safetensors"))


class Recorder(NullTracker):
    def __init__(self) -> None:
        self.metrics: list[tuple[dict, int | None]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((metrics, step))


def theseus_params(backbone: Path, glue: Path, **theseus: object) -> Params:
    section = {"batch_size": 8, "eval_batch_size": 16, "learning_rate": 1e-3, **theseus}
    return Params.model_validate(tiny_params(backbone, glue) | {"theseus": section})


def test_stage_end_to_end(project: Path) -> None:
    """data -> teacher -> theseus through the runner: output, metrics, replacing rate per step in tracking."""
    params = load_params(project / "params.yaml", ["theseus.batch_size=8", "theseus.learning_rate=1e-3"])
    layout = Layout(project)
    assert flow_stages("theseus") == ["data", "teacher", "theseus", "theseus_eval", "select"]
    assert "theseus" not in flow_stages("dynaflow")
    for name in ("data", "teacher"):
        run_stage(name, params, layout)
    tracker = Recorder()
    result = run_stage("theseus", params, layout, tracker)

    out = layout.out("theseus")
    assert result["out"] == str(out) == str(project / STAGES["theseus"].out)
    metrics = json.loads((project / "metrics" / "theseus.json").read_text())
    assert {"acc", "score", "train_seconds"} <= metrics.keys()
    assert metrics["layers"] == 1 and metrics["predecessor_layers"] == 2 and "predecessor.acc" in metrics
    assert metrics["parameters"] < metrics["predecessor_parameters"]
    successor = BertForSequenceClassification.from_pretrained(out)  # plain transformers
    assert successor.config.num_hidden_layers == 1
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()

    steps_per_epoch = 48 // 8  # tiny SST-2: 48 training examples
    records = json.loads((out / "replacing_rate.json").read_text())  # one record per step (DVC plots)
    rates = [(r["step"], r["replacing_rate"], r["replaced"]) for r in records]
    assert [r[0] for r in rates] == list(range(1, 2 * steps_per_epoch + 1))
    assert rates[0][1] == pytest.approx(0.3) and rates[steps_per_epoch - 1][1] < 1.0
    assert all(r[1] == 1.0 and r[2] == 1 for r in rates[steps_per_epoch:])  # successor-only phase
    assert any(r[2] == 0 for r in rates[:steps_per_epoch])  # a batch that replaced nothing: no update
    logged = {step: m["replacing_rate"] for m, step in tracker.metrics if "replacing_rate" in m}
    assert logged == {s: r for s, r, _ in rates}  # every step's rate went to the tracker
    assert any("final.dev.acc" in m for m, _ in tracker.metrics)


def test_resume_after_crash_matches_uninterrupted(
    tmp_path: Path, tiny_backbone: Path, tiny_glue: Path
) -> None:
    params = theseus_params(tiny_backbone, tiny_glue, epochs=2, finetune_epochs=1, checkpoint_steps=4)
    data_dir = prepare(tmp_path, params)
    teacher_dir = run_teacher(tmp_path, params, data_dir)

    def run(where: Path, on_step=None) -> dict[str, torch.Tensor]:
        out = where / "out"
        out.mkdir(parents=True, exist_ok=True)
        theseus_stage.compress(params.theseus, params.seed, teacher_dir, data_dir, out, where / "work", "fp",
                          NullTracker(), on_step)  # fmt: skip
        return load_file(out / "model.safetensors")

    reference = run(tmp_path / "a")

    def crash(step: int) -> None:
        if step == 5:  # in the replacing phase, one step after the step-4 checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crash)
    resumed = run(tmp_path / "b")
    assert reference.keys() == resumed.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=0, atol=1e-6, msg=name)


@pytest.fixture
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.mark.slow
def test_theseus_flow_shares_cached_stages_with_dynaflow(
    project: Path, prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from flows.pipeline import pipeline
    from flows.theseus import theseus

    params_path = str(project / "params.yaml")

    def statuses(results: dict) -> str:
        return " ".join(f"{name}:{r['status']}" for name, r in results.items())

    ran = "data:ran teacher:ran theseus:ran theseus_eval:ran select:ran"
    assert statuses(theseus(params_path=params_path)) == ran
    cached = "data:cached teacher:cached theseus:cached theseus_eval:cached select:cached"
    assert statuses(theseus(params_path=params_path)) == cached
    changed = theseus(params_path=params_path, overrides=["theseus.replacing_rate=0.5"])
    assert statuses(changed) == "data:cached teacher:cached theseus:ran theseus_eval:ran select:ran"
    # the flow ends with selection and the merged report: here the Theseus point alone (no DynaBERT yet)
    assert "theseus/L1" in (project / "reports" / "evaluation" / "report.md").read_text()
    # The DynaBERT flow reuses the same data and teacher outputs, and does not run theseus.
    assert statuses(pipeline(params_path=params_path, until="teacher")) == "data:cached teacher:cached"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("dynaflow").experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.data.tags["flow"] for r in parents) == ["dynaflow", "theseus", "theseus", "theseus"]
    ran = [r for r in runs if r.data.tags.get("stage") == "theseus" and r.data.tags.get("cached") == "false"]
    assert len(ran) == 2
    steps = 2 * -(-48 // 32)  # 2 epochs (1 replacing + 1 fine-tuning) of 48 examples at batch 32
    assert len(client.get_metric_history(ran[0].info.run_id, "replacing_rate")) == steps


def test_cli_checks_the_ratio_before_starting_prefect(project: Path, capsys: pytest.CaptureFixture) -> None:
    from dynaflow.cli import main

    argv = ["run", "--flow", "theseus", "--params", str(project / "params.yaml")]
    assert main([*argv, "--set", "theseus.compress_ratio=4"]) == 2
    assert "theseus.compress_ratio = 4 does not divide the predecessor's 2 layers" in capsys.readouterr().err
    assert main(["status", "--flow", "theseus", "--params", str(project / "params.yaml")]) == 1
    shown = capsys.readouterr().out
    stages = [line.split()[0] for line in shown.splitlines()]
    assert stages == ["data", "teacher", "theseus", "theseus_eval", "select"]
