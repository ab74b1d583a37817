"""What a user meets when something goes wrong (issue #20): one message on stderr and exit code 2 for
every expected error, no traceback; output folders checked before work; the project lock; leftovers of a
killed run cleaned up at the next start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynaflow.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def with_data_stage(project: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """The project's params path, once its data stage has run (its output is what the test damages)."""
    params = str(project / "params.yaml")
    assert main(["stage", "data", "--params", params, "--no-track"]) == 0
    capsys.readouterr()
    return params


def assert_one_message(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_malformed_override_and_unknown_until(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = str(project / "params.yaml")
    code, err = run_cli(capsys, "run", "--params", params, "--set", "teacher.epochs=[1,")
    assert code == 2
    assert_one_message(err, "teacher.epochs=[1,")
    code, err = run_cli(capsys, "run", "--params", params, "--until", "nosuch")
    assert code == 2
    assert_one_message(err, "'nosuch'", "teacher, rewire")
    code, err = run_cli(capsys, "stage", "nosuch", "--params", params)
    assert code == 2
    assert_one_message(err, "unknown stage 'nosuch'")


def test_help_lists_the_flows_stages() -> None:
    from dynaflow.cli.commands import DYNABERT_STAGES
    from stages import flow_stages

    assert list(DYNABERT_STAGES) == flow_stages("dynaflow")


@pytest.mark.parametrize("case", ["missing", "no_config", "gpt2"])
def test_backbones_that_cannot_work_are_refused_before_any_work(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    backbone = tmp_path / "backbone"
    if case == "no_config":
        backbone.mkdir()
    elif case == "gpt2":
        from transformers import GPT2Config

        GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50).save_pretrained(backbone)
    expected = {"missing": "no such directory", "no_config": "config.json", "gpt2": "gpt2"}[case]
    code, err = run_cli(
        capsys, "stage", "data", "--params", str(project / "params.yaml"), "--set", f"backbone={backbone}"
    )
    assert code == 2
    assert_one_message(err, str(backbone.name), expected)
    assert not (project / "data").exists()  # refused before the data stage wrote anything


def test_damaged_upstream_names_the_file(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = with_data_stage(project, capsys)
    with open(project / "data" / "prepared" / "train.parquet", "ab") as fh:
        fh.write(b"garbage")
    code, err = run_cli(capsys, "stage", "teacher", "--params", params, "--no-track")
    assert code == 2
    assert_one_message(
        err, "stage 'teacher' needs the output of stage 'data'", str(project / "data" / "prepared")
    )


def test_read_only_output_is_refused_before_training(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = with_data_stage(project, capsys)
    out = project / "artifacts" / "teacher"
    out.mkdir(parents=True)
    (out / "model.bin").write_text("an earlier model")
    out.chmod(0o555)
    real_access = os.access

    def access(path: object, mode: int) -> bool:  # root may write anywhere: answer as for a user
        return not (mode & os.W_OK and Path(str(path)) == out) and real_access(path, mode)

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "access", access)
            code, err = run_cli(capsys, "stage", "teacher", "--params", params, "--no-track")
    finally:
        out.chmod(0o755)
    assert code == 2
    assert_one_message(err, str(out), "not writable", "chmod")
    assert not (project / ".dynaflow" / "work" / "teacher").exists()  # refused before training


def test_debug_shows_the_traceback(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "--debug", "stage", "nosuch", "--params", str(project / "params.yaml"))
    assert code == 2 and "Traceback" in err and "error: unknown stage" in err


def test_broken_mlflow_store_is_named_before_any_work(project: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (project / "mlflow.db").write_bytes(b"")
    code, err = run_cli(capsys, "stage", "data", "--params", str(project / "params.yaml"))
    assert code == 2
    assert_one_message(err, str(project / "mlflow.db"), "--no-track")
    assert not (project / "data").exists()


def test_leftovers_of_a_killed_run_are_cleaned_up_at_the_next_start(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = with_data_stage(project, capsys)
    prepared = project / "data" / "prepared"
    before = json.loads((prepared / "manifest.json").read_text())
    # What a kill -9 leaves: a half-written temporary output and metrics file, and an output caught
    # between staged_output's two renames (the old one moved aside, the new one not yet in place).
    partial = project / "artifacts" / ".teacher.a1b2c3d4.tmp"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half")
    (project / "metrics" / ".teacher.json.x9y8z7w6.tmp.json").write_text("{")
    prepared.rename(project / "data" / ".prepared.old")
    assert main(["stage", "data", "--params", params, "--no-track"]) == 0
    err = capsys.readouterr().err
    assert "restored" in err and "removed" in err
    assert not partial.exists() and not list((project / "metrics").glob(".*.tmp*"))
    assert not (project / "data" / ".prepared.old").exists()
    assert json.loads((prepared / "manifest.json").read_text())["files"] == before["files"]


def _hold_lock(project: Path) -> subprocess.Popen[str]:
    """Another process holding the project lock (it prints once it has it)."""
    code = (
        "import sys, time\n"
        "from dynaflow.core.lock import project_lock\n"
        "with project_lock(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(project)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_waits_for_the_lock_or_fails_with_no_wait(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dynaflow.core.lock import project_lock

    holder = _hold_lock(project)
    try:
        code, err = run_cli(capsys, "stage", "data", "--params", str(project / "params.yaml"), "--no-wait")
        assert code == 2
        assert_one_message(err, f"pid {holder.pid}", "another dynaflow run")
        assert not (project / "data").exists()
        said: list[str] = []
        killer = subprocess.Popen(["sh", "-c", f"sleep 1; kill -9 {holder.pid}"])
        started = time.monotonic()
        with project_lock(project, say=said.append):  # a dead holder's lock is free at once
            waited = time.monotonic() - started
        killer.wait()
        assert waited >= 0.5 and len(said) == 1 and f"pid {holder.pid}" in said[0]
    finally:
        holder.kill()
        holder.wait()


def test_processes_started_under_the_lock_share_it(project: Path) -> None:
    from dynaflow.core.lock import HOLDER_ENV, project_lock

    with project_lock(project):
        assert os.environ[HOLDER_ENV] == str(project.resolve())
        child = subprocess.run(
            [sys.executable, "-c", "import sys; from dynaflow.core.lock import project_lock\n"
             "with project_lock(sys.argv[1], wait=False): print('ok')", str(project)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert child.stdout.strip() == "ok", child.stderr
    assert HOLDER_ENV not in os.environ


def test_empty_params_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "params.yaml").write_text("# only a comment\n")
    code, err = run_cli(capsys, "status", "--params", str(tmp_path / "params.yaml"))
    assert code == 2
    assert_one_message(err, str(tmp_path / "params.yaml"))


def test_status_into_a_closed_pipe_is_quiet(project: Path) -> None:
    cmd = f"{sys.executable} -m dynaflow.cli status --params {project / 'params.yaml'} | head -1"
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("data"), done
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_broken_prefect_database_is_named_before_prefect_starts(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "prefect.db").write_bytes(b"SQLite format 3\x00" + b"\x00" * 50)  # cut short
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    started = time.monotonic()
    code, err = run_cli(capsys, "run", "--params", str(project / "params.yaml"), "--no-track")
    assert code == 2 and time.monotonic() - started < 30  # not Prefect's 90 s start-up timeout
    assert_one_message(err, str(home / "prefect.db"), "--reset-prefect-db")


def test_missing_task_directory_and_unreachable_hub_are_one_message(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    params = str(project / "params.yaml")
    empty = tmp_path / "glue-without-sst2"
    empty.mkdir()
    code, err = run_cli(
        capsys, "stage", "data", "--params", params, "--no-track", "--set", f"data.glue_dir={empty}"
    )
    assert code == 2
    assert_one_message(err, str(empty / "SST-2" / "train.tsv"), "GLUE download layout")
    # No GLUE directory at all: the hub, which is offline here (HF_HUB_OFFLINE=1, as in the tests).
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # nothing cached
    code, err = run_cli(
        capsys, "stage", "data", "--params", params, "--no-track", "--set", "data.glue_dir=null"
    )
    assert code == 2
    assert_one_message(err, "Hugging Face hub", "GLUE_DIR")
