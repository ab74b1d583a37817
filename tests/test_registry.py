"""Cache keys from the import graph, the layers that keep it honest, and the flows built from the registry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dynaflow.config import load_params
from stages import STAGES, Layout, code_modules, flow_stages, flows
from stages import registry as reg

ROOT = Path(__file__).resolve().parents[1]


def project_modules() -> list[str]:
    return sorted(reg._import_graph(reg.PROJECT_PACKAGES).modules)


def test_closures_hold_the_modules_hand_kept_lists_had_missed() -> None:
    assert {"dynaflow.core.plots", "dynaflow.models.backbone"} <= set(code_modules("rewire"))
    assert "dynaflow.core.distributed" in code_modules("theseus")  # train.fit uses it
    for name in STAGES:  # every stage computes task metrics, defined by the GLUE task registry
        assert {"dynaflow.data.glue", f"stages.{STAGES[name].module.rpartition('.')[2]}"} <= set(
            code_modules(name)
        ), name
    # a method's code is in its stages' closures and in no other method's
    assert "dynaflow.methods.dynabert.distill" in code_modules("depth_kd")
    assert not any(m.startswith("dynaflow.methods.dynabert") for m in code_modules("theseus_eval"))
    assert not any(m.startswith("dynaflow.methods.theseus") for m in code_modules("evaluate"))
    # ConvBERT distils with DynaBERT's losses through the shared module, not through DynaBERT's package
    assert "dynaflow.training.kd" in set(code_modules("convbert")) & set(code_modules("depth_kd"))
    assert not any(m.startswith("dynaflow.methods.dynabert") for m in code_modules("convbert"))
    assert not any(m.startswith(("flows", "dynaflow.cli")) for n in STAGES for m in code_modules(n))


def downstream(names: set[str]) -> set[str]:
    """``names`` and every stage that reads, directly or not, one of their outputs."""
    out = set(names)
    changed = True
    while changed:
        changed = False
        for name, stage in STAGES.items():
            if name not in out and out & {*stage.upstream, *stage.gathers()}:
                out.add(name)
                changed = True
    return out


def test_touching_a_module_makes_exactly_its_stages_and_their_downstream_stale(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """For every project module: edit it (its digest changes) and ask ``dynaflow status``'s logic.

    Every stage whose import closure holds the module must run, and so must every stage downstream of one;
    no other stage. Outputs are simulated: an output is up to date while its key is the one it was built with.
    """
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the machine identity file
    params = load_params(ROOT / "params.yaml")
    layout = Layout(tmp_path)
    touched: set[Path] = set()
    monkeypatch.setattr(reg, "file_digest", lambda p: ("edited:" if Path(p) in touched else "") + str(p))
    monkeypatch.setattr(reg, "manifest_digest", lambda out: f"content of {out}")
    built: dict[Path, str] = {}

    def check_output(out: Path, key: str | None = None) -> str | None:
        return None if key in (None, built[out]) else "stale"

    monkeypatch.setattr(reg, "check_output", check_output)
    for name in STAGES:  # in order: selection's key sees the measurements it gathers as built
        built[layout.out(name)] = reg.stage_key(name, params, layout)
    everything = flow_stages("compare")
    assert reg.status(everything, params, layout) == dict.fromkeys(everything)

    for module in project_modules():
        touched.clear()
        touched.add(reg.module_file(module))
        problems = reg.status(everything, params, layout)
        stale = {n for n, p in problems.items() if p is not None}
        direct = {n for n in STAGES if module in code_modules(n)}
        assert stale == downstream(direct), module
        for name in stale - direct:
            assert problems[name].startswith("after "), (module, name, problems[name])


def test_no_module_imports_one_that_imports_it_back() -> None:
    import grimp

    graph = grimp.build_graph("dynaflow", "stages", "flows", cache_dir=None)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:  # Tarjan's strongly connected components
        index[m] = low[m] = len(index)
        stack.append(m)
        for n in graph.find_modules_directly_imported_by(m):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                component.append(n)
                if n == m:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    assert cycles == []


def test_import_contracts_hold() -> None:
    """The layers of ARCHITECTURE.md, as import-linter checks them (CI runs the same command)."""
    done = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout or "broken" not in done.stdout.split("Contracts:")[-1]


def test_flows_come_from_the_registry() -> None:
    assert flows() == ["adabert", "convbert", "dynaflow", "gates", "gates_dynabert", "theseus", "compare"]
    assert flow_stages("compare") == list(STAGES)
    for flow in ("dynaflow", "theseus", "convbert", "gates", "adabert", "gates_dynabert"):
        names = flow_stages(flow)
        assert names[-1] == "select" and names[:2] == ["data", "teacher"]
    assert "theseus" not in flow_stages("dynaflow") and "depth_kd" not in flow_stages("theseus")
    assert "rewire" in flow_stages("convbert") and "width_kd" not in flow_stages("convbert")
    assert {"depth_kd", "gates_dynabert_eval"} <= set(flow_stages("gates_dynabert"))
    assert "gates_dynabert" not in flow_stages("gates")
    listed = "flows: adabert, convbert, dynaflow, gates, gates_dynabert, theseus, compare"
    with pytest.raises(ValueError, match=listed):
        flow_stages("nosuch")


def test_registering_needs_unique_names_and_known_upstream() -> None:
    stage = STAGES["teacher"]
    with pytest.raises(ValueError, match="registered already"):
        reg.register(stage)
    with pytest.raises(ValueError, match=r"upstream \['nosuch'\] not registered"):
        reg.register(reg.Stage("x", "artifacts/x", (), ("nosuch",), stage.run))


def test_a_headline_uses_the_shared_columns_only() -> None:
    """A plug-in's headline with a key of its own would widen `dvc metrics show` by a column for every row:
    refused (run_stage computes it before the output is published)."""
    assert reg.rounded({"score": 0.812345, "selected": "dynabert/w1.0_d1.0"}) == {
        "score": 0.8123,
        "selected": "dynabert/w1.0_d1.0",
    }
    with pytest.raises(ValueError, match=r"\['accuracy'\] are not among"):
        reg.rounded({"accuracy": 0.8})
