"""Cheaper distillation steps: sandwich sampling, the cached teacher, bf16 autocast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dynaflow.config import Params
from dynaflow.data.splits import TokenizedSplit
from dynaflow.methods.dynabert.distill import (
    DistillStep,
    SubnetGrid,
    SubnetSampler,
    TeacherCache,
    pad_lengths,
)
from dynaflow.training import precision
from dynaflow.training.loop import TrainConfig, fit
from tests.conftest import tiny_elastic
from tests.test_distill import pipeline_dirs, run_phase  # noqa: F401  (pipeline_dirs is a fixture)

GRID = SubnetGrid((1.0, 0.75, 0.5, 0.25), (1.0, 0.75, 0.5))


def test_sandwich_always_trains_the_largest_and_smallest_and_k_others() -> None:
    sampler = SubnetSampler(GRID, "sandwich", k=2, seed=3)
    seen = set()
    for step in range(200):
        pairs = sampler.draw(step)
        assert len(pairs) == 4 and len(set(pairs)) == 4
        assert pairs[0] == (1.0, 1.0) and pairs[-1] == (0.5, 0.25)  # (depth, width), official order
        assert pairs == sorted(pairs, key=list(GRID).index)
        seen |= set(pairs)
    assert seen == set(GRID)  # every sub-network gets drawn


def test_sandwich_draws_are_a_function_of_seed_and_step() -> None:
    a, b = SubnetSampler(GRID, "sandwich", 2, seed=3), SubnetSampler(GRID, "sandwich", 2, seed=3)
    assert [a.draw(s) for s in range(50)] == [b.draw(s) for s in range(50)]
    assert [a.draw(s) for s in range(30, 50)] == [b.draw(s) for s in range(30, 50)]  # resume mid-way
    other = SubnetSampler(GRID, "sandwich", 2, seed=4)
    assert [a.draw(s) for s in range(50)] != [other.draw(s) for s in range(50)]
    assert len({tuple(a.draw(s)) for s in range(50)}) > 10  # draws vary from step to step


def test_all_rule_and_small_grids_train_everything() -> None:
    assert SubnetSampler(GRID, "all").draw(7) == list(GRID)
    small = SubnetGrid((1.0, 0.5), (1.0, 0.5))
    assert SubnetSampler(small, "sandwich", k=2).draw(7) == list(small)
    with pytest.raises(ValueError, match="sandwich"):
        SubnetSampler(GRID, "some")


def varied_split(n: int = 40, seed: int = 0) -> TokenizedSplit:
    """Examples of 3 to 14 tokens, so batches pad to different lengths in every epoch."""
    rng = np.random.default_rng(seed)
    ids = [np.concatenate([[2], rng.integers(5, 90, size=int(rng.integers(1, 12))), [3]]) for _ in range(n)]
    return TokenizedSplit(ids, [np.zeros_like(x) for x in ids], rng.integers(0, 2, size=n))


def distil(tmp_path: Path, cached: bool, teacher_width: str = "full") -> list[tuple[int, float]]:
    train, widths = varied_split(), [1.0, 0.5]
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    teacher, student = tiny_elastic(seed=1, **no_dropout), tiny_elastic(seed=2, **no_dropout)
    cfg = TrainConfig(epochs=3, batch_size=8, learning_rate=1e-3, seed=5)
    cache = None
    if cached:
        cache = TeacherCache(teacher, train, pad_lengths(train, cfg.batch_size, cfg.seed, cfg.epochs),
                             widths, 8, 0, torch.device("cpu"))  # fmt: skip
    step = DistillStep(
        student, teacher, SubnetSampler(SubnetGrid(tuple(widths), (1.0, 0.5)), "sandwich", 1, seed=5),
        lambda_logit=1.0, lambda_hidden=1.0, is_regression=False, teacher_width=teacher_width, cache=cache,
    )  # fmt: skip
    result = fit(student, train, step, cfg, checkpoint=tmp_path / f"{cached}.pt", fingerprint="t",
                 before_step=step.begin)  # fmt: skip
    return result.loss_history


@pytest.mark.parametrize("teacher_width", ["full", "student"])
def test_cached_teacher_gives_the_live_teachers_losses(tmp_path: Path, teacher_width: str) -> None:
    live = distil(tmp_path, cached=False, teacher_width=teacher_width)
    cached = distil(tmp_path, cached=True, teacher_width=teacher_width)
    assert len(live) == len(cached) == 15
    np.testing.assert_allclose([loss for _, loss in cached], [loss for _, loss in live], rtol=1e-5)


def test_pad_lengths_cover_every_batch_an_example_is_in() -> None:
    train = varied_split()
    lengths = pad_lengths(train, 8, seed=5, epochs=3)
    own = np.array([len(x) for x in train.input_ids])
    assert (lengths >= own).all() and (lengths > own).any()
    from dynaflow.data.splits import batch_order

    for epoch in range(3):
        for rows in batch_order(len(train), 8, True, 5, epoch):
            assert (lengths[rows] >= own[rows].max()).all()


def test_sampled_and_cached_distillation_resumes_where_it_stopped(
    pipeline_dirs: tuple[Params, Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    params, data_dir, teacher_dir = pipeline_dirs
    params.depth_kd.subnets, params.depth_kd.random_subnets = "sandwich", 1
    params.depth_kd.teacher_cache = True
    run_phase(params, "depth", teacher_dir, teacher_dir, data_dir, tmp_path / "a")

    def crash(step: int) -> None:
        if step == 9:  # second epoch, after the step-8 checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_phase(params, "depth", teacher_dir, teacher_dir, data_dir, tmp_path / "b", crash)
    run_phase(params, "depth", teacher_dir, teacher_dir, data_dir, tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    for n in a:  # a resume that restarted the draws at step 0 would train other sub-networks
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-6, msg=n)


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert precision.resolve("auto", cpu) == "fp32"
    assert precision.resolve("bf16", cpu) == "bf16"  # asked for explicitly: emulated, with a warning
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.resolve("auto", cpu) == "bf16"
    assert precision.resolve("fp32", cpu) == "fp32"
    with pytest.raises(ValueError, match="precision"):
        precision.resolve("fp8", cpu)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu avx512f avx512_vnni\n")
    assert not precision.cpu_has_bf16.__wrapped__(info)
    info.write_text("processor : 0\nflags : fpu avx512f avx512_bf16\n")
    assert precision.cpu_has_bf16.__wrapped__(info)
    assert not precision.cpu_has_bf16.__wrapped__(tmp_path / "missing")


@pytest.mark.parametrize("setting", ["fp32", "bf16"])
def test_training_learns_in_either_precision(tmp_path: Path, setting: str) -> None:
    train, dtypes = varied_split(seed=1), set()
    model = tiny_elastic(seed=0)

    def step(batch: dict[str, torch.Tensor], note: object) -> dict[str, float]:
        out = model(**batch)
        dtypes.add(model.classifier(out.logits.new_zeros(1, model.config.hidden_size)).dtype)
        out.loss.backward()
        return {"loss": out.loss.item()}

    cfg = TrainConfig(epochs=8, batch_size=8, learning_rate=3e-3, seed=0, precision=setting)
    result = fit(model, train, step, cfg, checkpoint=tmp_path / "c.pt", fingerprint="p")
    assert result.precision == setting
    assert dtypes == {torch.bfloat16 if setting == "bf16" else torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    losses = [loss for _, loss in result.loss_history]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_predict_batches_by_length_but_answers_in_the_splits_order() -> None:
    from dynaflow.evaluation.scoring import hf_logits, predict

    split, model = varied_split(n=37), tiny_elastic(seed=3)
    logits = predict(hf_logits(model), split, batch_size=8)
    with torch.no_grad():
        one_by_one = [
            model(input_ids=torch.as_tensor(ids)[None], token_type_ids=torch.as_tensor(tt)[None]).logits[0]
            for ids, tt in zip(split.input_ids, split.token_type_ids, strict=True)
        ]
    np.testing.assert_allclose(logits, torch.stack(one_by_one).numpy(), rtol=1e-4, atol=1e-5)
