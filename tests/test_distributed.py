"""Data-parallel training: N processes (torchrun, gloo on CPU) end with the weights of one, written once.

Run as a module under torchrun (``-m tests.test_distributed OUT``), this file is also the 2-process side of
the distillation check: :func:`distill_fit` trains a tiny elastic BERT with DynaBERT's step.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dynaflow.core import distributed as ddp
from dynaflow.core.tracking import NullTracker

ROOT = Path(__file__).resolve().parents[1]


# ---- shards, gradient weighting, loss averaging (one process, collectives simulated) -----------------------


def test_shards_cover_the_global_batch_in_order() -> None:
    for n in range(12):
        for world in (1, 2, 3, 4):
            parts = [list(ddp.shard(list(range(n)), r, world)) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            assert n == 0 or parts[0], "rank 0 always has examples"


class TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(3, 4)
        self.head = torch.nn.Linear(4, 2)
        self.unused = torch.nn.Linear(2, 2)  # no gradient on any rank: must stay None

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.head(torch.tanh(self.body(x))), y)


def simulate_all_reduce(
    models: list[torch.nn.Module], shards: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run all_reduce_gradients on each simulated rank; all_reduce sums what every rank contributed."""
    world, total = len(models), sum(shards)
    monkeypatch.setattr(ddp, "world_size", lambda: world)
    monkeypatch.setattr(ddp, "BUCKET_ELEMENTS", 10)  # several buckets
    contributed: list[list[torch.Tensor]] = []
    for model, n in zip(models, shards, strict=True):  # pass 1: what each rank puts in
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        sent: list[torch.Tensor] = []
        monkeypatch.setattr(ddp.dist, "all_reduce", lambda t, sent=sent: sent.append(t.clone()))
        ddp.all_reduce_gradients(model, n, total)
        contributed.append(sent)
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g
    for model, n in zip(models, shards, strict=True):  # pass 2: each rank gets the sum
        calls = iter(range(len(contributed[0])))

        def reduce(t: torch.Tensor, calls=calls) -> None:
            i = next(calls)
            t.copy_(sum(sent[i] for sent in contributed))

        monkeypatch.setattr(ddp.dist, "all_reduce", reduce)
        ddp.all_reduce_gradients(model, n, total)


@pytest.mark.parametrize("shards", [(3, 2), (1, 0), (2, 2, 1)])
def test_reduced_gradient_is_the_gradient_of_the_global_mean_loss(
    shards: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    reference = TwoHeads()
    x, y = torch.randn(sum(shards), 3), torch.randint(0, 2, (sum(shards),))
    ranks = [copy.deepcopy(reference) for _ in shards]
    reference.loss(x, y).backward()
    start = 0
    for model, n in zip(ranks, shards, strict=True):
        if n:  # a rank without examples runs no step: its gradients stay None
            model.loss(x[start : start + n], y[start : start + n]).backward()
        start += n
    simulate_all_reduce(ranks, list(shards), monkeypatch)
    for model in ranks:
        for (name, p), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
            if ref.grad is None:
                assert p.grad is None, name
            else:
                torch.testing.assert_close(p.grad, ref.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_logged_loss_is_the_example_weighted_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ddp, "world_size", lambda: 3)
    ranks = [(3, {"loss": 1.0, "loss.a": 2.0}), (2, {"loss": 4.0, "loss.a": 0.0}), (0, {})]
    monkeypatch.setattr(ddp.dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), ranks))
    assert ddp.mean_across_ranks({"loss": 1.0, "loss.a": 2.0}, 3) == pytest.approx(
        {"loss": (3 * 1.0 + 2 * 4.0) / 5, "loss.a": 6.0 / 5}
    )


def test_one_process_is_untouched() -> None:
    assert not ddp.launched() and ddp.world_size() == 1 and ddp.is_main() and not ddp.init()
    model = TwoHeads()
    model.loss(torch.randn(4, 3), torch.tensor([0, 1, 0, 1])).backward()
    before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    ddp.all_reduce_gradients(model, 4, 4)
    for p, g in zip(model.parameters(), before, strict=True):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert ddp.mean_across_ranks({"loss": 2.0}, 4) == {"loss": 2.0}


# ---- the launch option ---------------------------------------------------------------------------------


def test_stage_relaunches_itself_under_torchrun(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dynaflow.cli import commands as cli

    calls: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    params = project / "params.yaml"
    args = ["stage", "teacher", "--params", str(params), "--set", "teacher.epochs=2", "--no-track"]
    assert cli.main([*args, "--nproc", "2"]) == 0
    cmd, env = calls.pop()
    assert cmd == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "dynaflow.cli", "stage", "teacher", "--params", str(params.resolve()),
        "--set=teacher.epochs=2", "--set=launch.nproc_per_node=2", "--no-track",
    ]  # fmt: skip
    assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))

    # Several machines: static rendezvous at node 0; each machine passes its own --node-rank.
    multi = ["--set", "launch.nnodes=2", "--set", "launch.rdzv_endpoint=node0:29500"]
    assert cli.main([*args, *multi, "--nproc", "4", "--node-rank", "1"]) == 0
    cmd, _ = calls.pop()
    launcher = cmd[: cmd.index("dynaflow.cli")]
    assert launcher[3:] == ["--nnodes", "2", "--node-rank", "1", "--master-addr", "node0", "--master-port",
                            "29500", "--nproc-per-node", "4", "-m"]  # fmt: skip
    assert "--set=launch.node_rank=1" in cmd

    # Inside torchrun (WORLD_SIZE set) it does not launch again; a stage that does not train never does.
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ddp.launched()
    monkeypatch.delenv("WORLD_SIZE")
    assert cli.main(["stage", "data", "--params", str(params), "--nproc", "2", "--no-track"]) == 0
    assert not calls and (project / "data" / "prepared" / "manifest.json").is_file()


def test_launch_is_not_part_of_any_cache_key(project: Path) -> None:
    from dynaflow.config import load_params
    from stages import Layout, stage_key

    path = project / "params.yaml"
    one, many = load_params(path), load_params(path, ["launch.nproc_per_node=8", "launch.nnodes=2",
                                                       "launch.rdzv_endpoint=host:1234"])  # fmt: skip
    assert stage_key("data", one, Layout(project)) == stage_key("data", many, Layout(project))


def test_flow_launches_with_exactly_its_params(project: Path) -> None:
    from dynaflow.config import load_params
    from flows.pipeline import launch_command

    path = project / "params.yaml"
    sets = ["teacher.learning_rate=3e-05", "widths=[1.0, 0.5]", "data.glue_dir=null", "backbone='007'",
            "launch.nproc_per_node=2"]  # fmt: skip
    wanted = load_params(path, sets).model_dump(mode="json")
    cmd = launch_command("teacher", wanted, path, "abc123")
    assert cmd[3:6] == ["--standalone", "--nproc-per-node", "2"]
    assert cmd[cmd.index("--run-id") + 1] == "abc123"
    sets = [a.removeprefix("--set=") for a in cmd if a.startswith("--set=")]
    assert len(sets) == 5  # only what differs from the file
    assert load_params(path, sets).model_dump(mode="json") == wanted


# ---- end to end: torchrun, 2 processes, gloo -----------------------------------------------------------


@pytest.fixture
def dropout_free_backbone(tiny_backbone: Path, tmp_path: Path) -> Path:
    """Dropout draws differ between 1 and 2 processes; without it, the two runs compute the same steps."""
    path = tmp_path / "tiny-bert-no-dropout"
    shutil.copytree(tiny_backbone, path)
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(config))
    return path


def torchrun_env(tmp_path: Path) -> dict[str, str]:
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch), "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_teacher_on_two_processes_matches_one_and_writes_once(
    tmp_path: Path, dropout_free_backbone: Path, tiny_glue: Path
) -> None:
    from safetensors.torch import load_file

    from dynaflow.config import Params, load_params
    from dynaflow.core.artifacts import check_output, read_manifest
    from stages import Layout, run_stage
    from tests.conftest import tiny_params

    raw = tiny_params(dropout_free_backbone, tiny_glue, epochs=2, checkpoint_steps=2)
    raw["data"]["max_train_examples"] = 21  # global batches 8, 8, 5: the last one splits 3 + 2
    raw["teacher"]["precision"] = "fp32"  # bf16 rounds each process's part differently: checked in fp32
    full = Params.model_validate(raw).model_dump(mode="json")
    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):
        root.mkdir()
        (root / "params.yaml").write_text(yaml.safe_dump(full))
    params = load_params(one / "params.yaml")
    run_stage("data", params, Layout(one))
    shutil.copytree(one / "data", two / "data")
    run_stage("teacher", params, Layout(one))

    done = subprocess.run(
        [sys.executable, "-m", "dynaflow.cli", "stage", "teacher", "--params", str(two / "params.yaml"),
         "--nproc", "2", "--no-track"],
        cwd=two, env=torchrun_env(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "--standalone --nproc-per-node 2" in done.stderr  # it re-executed under torchrun

    a = load_file(one / "artifacts" / "teacher" / "model.safetensors")
    b = load_file(two / "artifacts" / "teacher" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5, msg=name)
    curve_a = json.loads((one / "artifacts" / "teacher" / "loss_curve.json").read_text())
    curve_b = json.loads((two / "artifacts" / "teacher" / "loss_curve.json").read_text())
    assert [r["step"] for r in curve_b] == [r["step"] for r in curve_a] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in curve_b], [r["loss"] for r in curve_a], rtol=1e-5)

    # Written once, by rank 0: one output, same cache key as the 1-process run (launch is not in it),
    # no leftovers (staging dirs, checkpoints, the other rank's scratch), one summary.
    key = read_manifest(one / "artifacts" / "teacher")["cache_key"]
    assert check_output(two / "artifacts" / "teacher", key) is None
    assert sorted(p.name for p in (two / "artifacts").iterdir()) == ["teacher"]
    written = sorted(p.relative_to(two / "metrics").as_posix() for p in (two / "metrics").rglob("*.json"))
    assert written == ["headline/teacher.json", "teacher.json"]
    assert not (two / ".dynaflow" / "work" / "teacher").exists()
    assert not list((tmp_path / "scratch").glob("dynaflow-*"))  # rank 1's throw-away output is gone
    assert done.stdout.count('"stage": "teacher"') == 1


# ---- distillation's step (several backward passes, padding-sensitive hidden loss) ----------------------


class FileTracker(NullTracker):
    """Records each rank's tracker calls in its own file: only rank 0's may exist."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        with open(self.folder / f"tracked-rank{ddp.rank()}.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")


def distill_fit(out: Path) -> None:
    """A few steps of width-and-depth distillation on a tiny elastic BERT; rank 0 saves the weights."""
    from transformers import BertConfig

    from dynaflow.data.splits import TokenizedSplit
    from dynaflow.methods.dynabert.distill import SubnetGrid, make_distill_step
    from dynaflow.models.elastic_bert import ElasticBertForSequenceClassification
    from dynaflow.training.loop import TrainConfig, fit

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(0)
    teacher = ElasticBertForSequenceClassification(config)
    student = ElasticBertForSequenceClassification(config)
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 12, size=13)  # ragged: each shard is cut from the batch padded as a whole
    ids = [rng.integers(5, 50, size=n) for n in lengths]
    train = TokenizedSplit(ids, [np.zeros(n, dtype=np.int64) for n in lengths], rng.integers(0, 2, size=13))
    step = make_distill_step(student, teacher, SubnetGrid((1.0, 0.5), (1.0, 0.5)), lambda_logit=1.0,
                             lambda_hidden=1.0, is_regression=False)  # fmt: skip
    cfg = TrainConfig(epochs=1, batch_size=6, learning_rate=1e-3, seed=3, warmup_ratio=0.2, log_every=1)
    fit(student, train, step, cfg, checkpoint=out.parent / f"ckpt-{out.stem}.pt", fingerprint="fp",
        tracker=FileTracker(out.parent))  # fmt: skip
    if ddp.is_main():
        torch.save(student.state_dict(), out)


@pytest.mark.slow
def test_distillation_on_two_processes_matches_one(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    distill_fit(tmp_path / "one" / "weights.pt")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "tests.test_distributed", str(tmp_path / "weights.pt")],
        cwd=ROOT, env=torchrun_env(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a, b = torch.load(tmp_path / "one" / "weights.pt"), torch.load(tmp_path / "weights.pt")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5, msg=name)
    # Only rank 0 recorded; what it recorded (losses averaged over ranks) is what one process recorded.
    assert sorted(p.name for p in tmp_path.glob("tracked-*")) == ["tracked-rank0.jsonl"]
    one = [json.loads(line) for line in (tmp_path / "one" / "tracked-rank0.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "tracked-rank0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]  # 13 examples, batches of 6
    for r1, r2 in zip(one, two, strict=True):
        assert r2.keys() == r1.keys()
        for k in r1:
            if k.startswith("loss"):
                assert r2[k] == pytest.approx(r1[k], rel=1e-5), k


if __name__ == "__main__":  # one process of the 2-process side of the test above
    distill_fit(Path(sys.argv[1]))
    ddp.shutdown()
