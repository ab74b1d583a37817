"""DynaBERT distillation: summed per-sub-network gradients, shared weights, learning, stages, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig

from dynaflow.config import Params
from dynaflow.core.tracking import NullTracker
from dynaflow.data.glue import read_split
from dynaflow.methods.dynabert.distill import SubnetGrid, make_distill_step
from dynaflow.models.elastic_bert import ElasticBertForSequenceClassification, hidden_layer_map
from dynaflow.training.kd import hidden_loss, soft_cross_entropy
from stages import data, distill, teacher
from tests.conftest import poisoned_copy, tiny_params

CONFIG = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=32, num_labels=2)  # fmt: skip
GRID = SubnetGrid((1.0, 0.75, 0.5, 0.25), (1.0, 0.75, 0.5))


def models() -> tuple[ElasticBertForSequenceClassification, ElasticBertForSequenceClassification]:
    torch.manual_seed(0)
    teacher = ElasticBertForSequenceClassification(CONFIG)
    student = ElasticBertForSequenceClassification(CONFIG)
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():  # a perturbed copy, so the student has something to learn
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student.eval(), teacher  # eval: no dropout, so the gradient check is exact


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (6, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.tensor([0, 1, 0, 1, 1, 0])}  # fmt: skip


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulated_gradient_is_sum_of_per_subnetwork_gradients() -> None:
    student, teacher = models()
    step = make_distill_step(student, teacher, GRID, lambda_logit=1.0, lambda_hidden=1.0, is_regression=False)
    step(batch(), lambda _: None)
    together = grads(student)

    expected: dict[str, torch.Tensor] = {}
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        t = teacher(**inputs, output_hidden_states=True)
    for depth, width in GRID:
        student.zero_grad()
        s = student(**inputs, width_mult=width, depth_mult=depth, output_hidden_states=True)
        loss = soft_cross_entropy(s.logits, t.logits) + hidden_loss(
            s.hidden_states, t.hidden_states, hidden_layer_map(4, depth)
        )
        loss.backward()
        for n, g in grads(student).items():
            expected[n] = expected.get(n, 0) + g
    assert together.keys() == expected.keys()
    for n in together:
        torch.testing.assert_close(together[n], expected[n], rtol=1e-4, atol=1e-6, msg=n)


def test_one_step_moves_weights_shared_by_all_widths() -> None:
    student, teacher = models()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    step = make_distill_step(student, teacher, SubnetGrid((1.0, 0.25), (1.0,)), lambda_logit=1.0,
                             lambda_hidden=0.1, is_regression=False)  # fmt: skip
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    step(batch(), lambda _: None)
    opt.step()
    after = dict(student.named_parameters())
    head = CONFIG.hidden_size // CONFIG.num_attention_heads
    query = "bert.encoder.layer.0.attention.self.query.weight"
    # The first head and the first FFN neurons belong to every width: they must move.
    assert not torch.equal(after[query][:head], before[query][:head])
    ffn = "bert.encoder.layer.0.intermediate.dense.weight"
    assert not torch.equal(after[ffn][:16], before[ffn][:16])
    assert not torch.equal(after["bert.embeddings.word_embeddings.weight"],
                           before["bert.embeddings.word_embeddings.weight"])  # fmt: skip


def test_loss_falls_on_a_fixed_batch() -> None:
    student, teacher = models()
    student.train()
    step = make_distill_step(student, teacher, GRID, lambda_logit=1.0, lambda_hidden=1.0, is_regression=False)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        losses.append(step(batch(), lambda _: None)["loss"])
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.5 * losses[0], losses


def test_teacher_width_student_uses_width_matched_targets() -> None:
    student, teacher = models()
    grid = SubnetGrid((0.5,), (1.0,))
    full = make_distill_step(student, teacher, grid, lambda_logit=1.0, lambda_hidden=1.0, is_regression=False)
    matched = make_distill_step(student, teacher, grid, lambda_logit=1.0, lambda_hidden=1.0,
                                is_regression=False, teacher_width="student")  # fmt: skip
    assert full(batch(), lambda _: None)["loss"] != pytest.approx(matched(batch(), lambda _: None)["loss"])
    with pytest.raises(ValueError, match="teacher_width"):
        make_distill_step(student, teacher, grid, lambda_logit=1, lambda_hidden=1, is_regression=False,
                          teacher_width="half")  # fmt: skip


@pytest.fixture
def pipeline_dirs(tmp_path: Path, tiny_backbone: Path, tiny_glue: Path) -> tuple[Params, Path, Path]:
    params = Params.model_validate(tiny_params(tiny_backbone, tiny_glue) | {
        "width_kd": {"batch_size": 8, "learning_rate": 1e-3, "checkpoint_steps": 2},
        "depth_kd": {"batch_size": 8, "learning_rate": 1e-3, "epochs": 2, "checkpoint_steps": 2},
    })  # fmt: skip
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data.prepare(params.data, params.backbone, params.seed, data_dir, NullTracker())
    teacher_dir = tmp_path / "teacher"
    from dynaflow.models.backbone import load_classifier

    torch.manual_seed(0)
    model = load_classifier(params.backbone, 2)
    model.save_pretrained(teacher_dir)
    return params, data_dir, teacher_dir


def run_phase(params: Params, phase: str, student: Path, teacher: Path, data_dir: Path, out: Path,
              on_step=None) -> dict:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    cfg = params.width_kd if phase == "width" else params.depth_kd
    work = out.parent / f"work-{out.name}"
    return distill.distill(phase, cfg, params.widths, params.depths, params.seed, student, teacher, data_dir,
                       data_dir, out, work, "fp", NullTracker(), on_step)  # fmt: skip


def test_width_then_depth_stages_write_the_grid(
    pipeline_dirs: tuple[Params, Path, Path], tmp_path: Path
) -> None:
    params, data_dir, teacher_dir = pipeline_dirs
    width = run_phase(params, "width", teacher_dir, teacher_dir, data_dir, tmp_path / "w")
    assert {k.removeprefix("dev.").rsplit(".", 1)[0] for k in width if k.startswith("dev.")} == {
        f"w{w}_d1.0" for w in params.widths
    }
    depth = run_phase(params, "depth", tmp_path / "w", tmp_path / "w", data_dir, tmp_path / "d")
    grid = json.loads((tmp_path / "d" / "grid.json").read_text())
    assert len(grid) == 12 and all(0 <= r["acc"] <= 1 for r in grid.values())
    assert depth["selected_step"] in (6, 12)  # epoch ends of a 6-step epoch
    assert (tmp_path / "d" / "grid.png").stat().st_size > 1000


def test_distillation_resumes_where_it_stopped(
    pipeline_dirs: tuple[Params, Path, Path], tmp_path: Path
) -> None:
    params, data_dir, teacher_dir = pipeline_dirs
    params = params.model_copy(update={"widths": [1.0, 0.5], "depths": [1.0, 0.5]})
    run_phase(params, "depth", teacher_dir, teacher_dir, data_dir, tmp_path / "a")

    def crash(step: int) -> None:
        if step == 9:  # second epoch, after the step-8 checkpoint and the epoch-1 selection
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_phase(params, "depth", teacher_dir, teacher_dir, data_dir, tmp_path / "b", crash)
    run_phase(params, "depth", teacher_dir, teacher_dir, data_dir, tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-6, msg=n)
    assert json.loads((tmp_path / "a" / "grid.json").read_text()) == json.loads(
        (tmp_path / "b" / "grid.json").read_text()
    )


def test_heldout_selection_never_sees_dev(pipeline_dirs: tuple[Params, Path, Path], tmp_path: Path) -> None:
    """Checkpoints chosen on the held-out rows: with a poisoned dev set (conftest.poisoned_copy), the same
    step is kept and the same weights come out; choosing on dev follows the poison."""
    params, data_dir, student_dir = pipeline_dirs
    params = params.model_copy(update={"widths": [1.0, 0.5]})
    params.width_kd.epochs, params.width_kd.eval_every = 3, 1  # many checkpoints to choose from
    params.width_kd.learning_rate = 1e-2  # large steps: the untrained student learns within the run
    assert params.width_kd.selection == "heldout"  # the default
    poisoned = poisoned_copy(data_dir, tmp_path / "poisoned-data")
    params.teacher.epochs, params.teacher.learning_rate = 4, 1e-2  # a teacher that has learnt the task
    teacher_dir = tmp_path / "trained-teacher"
    teacher_dir.mkdir()
    teacher.fine_tune(params.teacher, params.backbone, params.seed, data_dir, teacher_dir, tmp_path / "work",
                      "fp", NullTracker())  # fmt: skip

    clean = run_phase(params, "width", student_dir, teacher_dir, data_dir, tmp_path / "clean")
    dirty = run_phase(params, "width", student_dir, teacher_dir, poisoned, tmp_path / "dirty")
    assert dirty["selected_step"] == clean["selected_step"] and clean["train_examples"] == 48
    a, b = (
        load_file(tmp_path / "clean" / "model.safetensors"),
        load_file(tmp_path / "dirty" / "model.safetensors"),
    )
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert dirty["dev.w1.0_d1.0.acc"] != clean["dev.w1.0_d1.0.acc"]  # reported on dev, never chosen on it

    params.width_kd.selection = "dev"
    on_dev = [run_phase(params, "width", student_dir, teacher_dir, d, tmp_path / f"dev-{d.name}")
              for d in (data_dir, poisoned)]  # fmt: skip
    assert on_dev[0]["selected_step"] != on_dev[1]["selected_step"]


def test_heldout_rows_are_set_aside_from_training(tiny_glue: Path, tmp_path: Path) -> None:
    from dynaflow.config import ConfigError
    from stages.data import train_and_heldout

    split = read_split("sst2", tiny_glue, "train")
    train, heldout = train_and_heldout(split, None, 8, seed=1)
    assert (len(train.labels), len(heldout.labels)) == (48, 8)
    assert sorted(train.text_a + heldout.text_a) == sorted(split.text_a)  # a partition of the training rows
    subset, held = train_and_heldout(split, 20, 8, seed=1)
    assert len(subset.labels) == 20 and len(held.labels) == 8
    # the training subset is the one drawn without a held-out slice: comparable with earlier runs
    assert train_and_heldout(split, 20, 0, seed=1)[0].text_a == subset.text_a
    with pytest.raises(ConfigError, match="leaves nothing to train on"):
        train_and_heldout(split, None, 56, seed=1)


def test_final_finetuning_trains_every_subnetwork_on_labels(
    pipeline_dirs: tuple[Params, Path, Path], tmp_path: Path
) -> None:
    params, data_dir, teacher_dir = pipeline_dirs
    params = params.model_copy(update={"widths": [1.0, 0.5], "depths": [1.0, 0.5]})
    params.depth_kd.epochs = 1
    run_phase(params, "depth", teacher_dir, teacher_dir, data_dir, tmp_path / "plain")
    params.depth_kd.final_finetune_epochs = 1
    run_phase(params, "depth", teacher_dir, teacher_dir, data_dir, tmp_path / "tuned")
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    tuned = load_file(tmp_path / "tuned" / "model.safetensors")
    # The label phase moved the weights after distillation, classifier included.
    assert not torch.equal(plain["classifier.weight"], tuned["classifier.weight"])
