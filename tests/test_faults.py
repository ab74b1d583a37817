"""Fault injection (issue #20): a run killed (SIGKILL) or stopped (SIGINT, SIGTERM) at points in the data,
teacher, distillation and evaluation stages, then run again, ends exactly where an uninterrupted run ends:
same outputs, no temporary leftovers, no MLflow run left RUNNING, no temporary Prefect server left behind.
Two runs at once in one project: one waits (or, with --no-wait, says who holds the project), both correct.

Faults are injected with ``DYNAFLOW_FAULT=POINT:SIGNAL`` (dynaflow.core.faults): the process signals
itself at that point, so every case is deterministic.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

# Stages with deterministic outputs, compared with a clean run's.
TRAINED = ("data", "teacher", "rewire", "augment", "width_kd")


def dynaflow(project: Path, *args: str, fault: str | None = None, **popen: object) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env["DYNAFLOW_FAULT"] = fault or ""
    cmd = [sys.executable, "-m", "dynaflow.cli", *args, "--params", str(project / "params.yaml")]
    return subprocess.Popen(cmd, cwd=project, env=env, text=True, **popen)  # type: ignore[call-overload]


def run(project: Path, *args: str, fault: str | None = None) -> tuple[int, str]:
    proc = dynaflow(project, *args, fault=fault, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def servers_of(project: Path) -> list[int]:
    """Temporary Prefect servers started for this project (by their PREFECT_HOME), still alive."""
    home = f"PREFECT_HOME={project / '.prefect-home'}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"uvicorn" in (proc / "cmdline").read_bytes():
                if home in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


def no_server_left(project: Path, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while servers_of(project):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def leftovers(project: Path) -> list[str]:
    return sorted(
        str(p.relative_to(project))
        for p in project.rglob(".*")
        if ".tmp" in p.name or p.name.endswith(".old")
        if ".prefect-home" not in p.parts
    )


def run_statuses(project: Path) -> list[str]:
    with sqlite3.connect(project / "mlflow.db") as db:
        return [row[0] for row in db.execute("SELECT status FROM runs")]


def files_of(project: Path, stage: str) -> dict[str, str]:
    from stages import Layout

    return json.loads((Layout(project).out(stage) / "manifest.json").read_text())["files"]


@pytest.fixture
def fault_project(project: Path) -> Path:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["teacher"]["checkpoint_steps"] = 2  # a kill mid-epoch resumes from a step, not the epoch start
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    return project


def test_killed_and_interrupted_runs_resume_to_the_uninterrupted_result(
    fault_project: Path, tmp_path: Path
) -> None:
    from dynaflow.config import load_params
    from stages import Layout, run_stage

    project = fault_project
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "params.yaml").write_text((project / "params.yaml").read_text())
    for name in TRAINED:  # the reference: every stage once, in-process, never interrupted
        run_stage(name, load_params(clean / "params.yaml"), Layout(clean))

    cases = [  # (fault point, signal, the exit code it must give)
        ("commit.prepared", "KILL", -signal.SIGKILL),  # data: output complete, not yet in place
        ("step.teacher.3", "KILL", -signal.SIGKILL),  # teacher: between two checkpoints
        ("step.distill-width.1", "INT", 128 + signal.SIGINT),  # width_kd: Ctrl-C
        ("commit.evaluation", "TERM", 128 + signal.SIGTERM),  # evaluate: SIGTERM while committing
    ]
    for point, sig, code in cases:
        got, err = run(project, "run", "--until", "evaluate", fault=f"{point}:{sig}")
        assert got == code, (point, err[-3000:])
        assert "Traceback" not in err, (point, err[-3000:])
        assert no_server_left(project), f"{point}: the temporary Prefect server outlived the run"
        if sig != "KILL":  # a stopped run cleans up itself and closes its MLflow runs
            assert "interrupted" in err and leftovers(project) == [], (point, leftovers(project))
            assert "RUNNING" not in run_statuses(project), point
            assert "KILLED" in run_statuses(project), point

    got, err = run(project, "run", "--until", "evaluate")
    assert got == 0, err[-3000:]
    assert leftovers(project) == [] and not servers_of(project)
    assert "RUNNING" not in run_statuses(project)
    for name in TRAINED:
        assert files_of(project, name) == files_of(clean, name), name
    assert (project / "artifacts" / "evaluation" / "manifest.json").is_file()


def test_two_runs_at_once_one_waits_and_both_end_correct(project: Path) -> None:
    first = dynaflow(project, "stage", "data", "--no-track", fault="commit.prepared:STOP",
                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not leftovers(project):  # stopped holding the lock, its output not yet in place
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not get there"
            time.sleep(0.2)
        code, err = run(project, "stage", "data", "--no-track", "--no-wait")
        assert code == 2 and f"pid {first.pid}" in err and "Traceback" not in err, err
        second = dynaflow(project, "stage", "data", "--no-track", stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL)  # fmt: skip
        time.sleep(5)
        assert second.poll() is None  # waiting for the lock
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=120) == 0
        _, err = second.communicate(timeout=300)
        assert second.returncode == 0 and "waiting for the project lock" in err, err
    finally:
        for proc in (first,):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
    assert leftovers(project) == []
    from dynaflow.core.artifacts import check_output
    from stages import Layout

    assert check_output(Layout(project).out("data")) is None


def test_a_data_error_inside_the_flow_is_one_message(project: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    train = Path(params["data"]["glue_dir"]) / "SST-2" / "train.tsv"
    with open(train, "a") as fh:
        fh.write("a row without its label\n")
    code, err = run(project, "run", "--until", "teacher", "--no-track")
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "train.tsv:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "skip_malformed" in errors[0], err
    assert no_server_left(project)
