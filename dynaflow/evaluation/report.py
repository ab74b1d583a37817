"""The evaluation report: per hardware profile one table and one metric-vs-latency plot with every method's
candidates on one Pareto front, the selection starred, the budget drawn.

Everything here works from stored results (``results.json`` of a method's measurement stage, of the
selection stage, or of a profile measured on another machine), so ``dynaflow report`` can rebuild the
report, merging results measured on several machines, without a model or the hardware.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dynaflow.core import plots
from dynaflow.core.artifacts import atomic_file, atomic_write_bytes, file_digest
from dynaflow.core.plots import pyplot
from dynaflow.evaluation import selection
from dynaflow.evaluation.machine import BUSY_CORES
from dynaflow.evaluation.selection import latency_key, pareto_front

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
MARKERS = "osD^vP*X"  # one per method, in the order methods appear


def plot_file(profile: str) -> str:
    return f"pareto_{profile}.png"


def methods_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def family(row: dict[str, Any]) -> str:
    """A plot's marker group: the method, its int8 variants apart (``dynabert int8``)."""
    return row["method"] + (" int8" if row.get("precision") == "int8" else "")


def plot_points(entry: dict[str, Any], stat: str = "median") -> list[dict[str, Any]]:
    """The points the profile's plot draws: one per measured candidate, with front and selection flags."""
    rows = entry.get("rows") or []
    front = pareto_front(rows, stat)
    chosen = ((entry.get("selection") or {}).get("row") or {}).get("candidate")
    key = latency_key(stat)
    return [
        {
            "candidate": r["candidate"],
            "method": r["method"],
            "family": family(r),
            "label": r.get("label") or r["name"],
            "latency_ms": r[key],
            "metric": r["metric"],
            "on_front": on,
            "selected": r["candidate"] == chosen,
        }
        for r, on in zip(rows, front, strict=True)
    ]


# Where a point's label may go, in points from the point (and its alignment), tried in this order.
LABEL_SPOTS = ((3, 3, "left"), (3, -9, "left"), (-3, 3, "right"), (-3, -9, "right"), (3, 10, "left"),
               (3, -16, "left"), (-3, 10, "right"), (-3, -16, "right"))  # fmt: skip


def place_labels(ax: Any, points: Sequence[dict[str, Any]], colors: dict[str, str]) -> list[Any]:
    """Annotate each point with its label at the first spot that overlaps no label placed before (the
    first spot when none is free); returns the labels' display boxes."""
    renderer = ax.figure.canvas.get_renderer()
    placed: list[Any] = []
    for p in sorted(points, key=lambda p: (p["latency_ms"], -p["metric"])):
        for spot in LABEL_SPOTS:
            box = (text := _label(ax, p, colors[p["family"]], *spot)).get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            text.remove()
        else:
            box = _label(ax, p, colors[p["family"]], *LABEL_SPOTS[0]).get_window_extent(renderer)
        placed.append(box)
    return placed


def _label(ax: Any, p: dict[str, Any], color: str, dx: int, dy: int, ha: str) -> Any:
    return ax.annotate(p["label"], (p["latency_ms"], p["metric"]), xytext=(dx, dy), ha=ha,
                       textcoords="offset points", fontsize=7, color=color)  # fmt: skip


def pareto_plot(
    entry: dict[str, Any],
    metric_name: str,
    path: Path,
    budget_stat: str = "p90",
    reference: dict[str, float | None] | None = None,
) -> None:
    """Dev metric against the latency statistic the budget applies to, a marker per method and precision
    (a faint bar from the median to the p90), the front (all methods) joined by a line; the teacher, the
    chance score and the quality floor as horizontal lines, candidates below the floor crossed out."""
    plt = pyplot()
    points = plot_points(entry, budget_stat)
    spread = {r["candidate"]: (r["latency_median_ms"], r["latency_p90_ms"]) for r in entry.get("rows") or []}
    profile, reference = entry["profile"], reference or {}
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    colors = {}
    for i, group in enumerate(dict.fromkeys(p["family"] for p in points)):
        colors[group] = f"C{i}"
        mine = [p for p in points if p["family"] == group]
        ax.hlines([p["metric"] for p in mine], [spread[p["candidate"]][0] for p in mine],
                  [spread[p["candidate"]][1] for p in mine], color=f"C{i}", alpha=0.35, lw=2)  # fmt: skip
        ax.scatter([p["latency_ms"] for p in mine], [p["metric"] for p in mine], marker=MARKERS[i % 8], s=34,
                   color=f"C{i}", label=group, zorder=3)  # fmt: skip
    front = sorted((p for p in points if p["on_front"]), key=lambda p: p["latency_ms"])
    ax.plot([p["latency_ms"] for p in front], [p["metric"] for p in front], "-", color="0.3", lw=1,
            label="Pareto front (all methods)", zorder=2)  # fmt: skip
    floor = reference.get("floor")
    below = [p for p in points if floor is not None and p["metric"] < floor]
    if below:
        ax.scatter([p["latency_ms"] for p in below], [p["metric"] for p in below], marker="x", s=70,
                   color="0.25", zorder=5, label="below the quality floor")  # fmt: skip
    chosen = [p for p in points if p["selected"]]
    if chosen:
        ax.scatter([chosen[0]["latency_ms"]], [chosen[0]["metric"]], marker="*", s=260, color="tab:red",
                   zorder=4, label=f"selected ({chosen[0]['candidate']})")  # fmt: skip
    lines = (("teacher", "tab:green", ":"), ("chance", "0.5", ":"), ("floor", "tab:orange", "--"))
    names = {"teacher": "teacher", "chance": "majority class / chance", "floor": "quality floor"}
    for key, color, style in lines:
        if reference.get(key) is not None:
            ax.axhline(reference[key], color=color, ls=style, lw=1,
                       label=f"{names[key]} ({reference[key]:.3f})")  # fmt: skip
    if profile.get("latency_ms") is not None:
        ax.axvline(profile["latency_ms"], color="tab:red", ls="--", lw=1,
                   label=f"budget ({budget_stat} ≤ {profile['latency_ms']:g} ms)")  # fmt: skip
    ax.set_xlabel(f"latency per batch, {budget_stat} (ms); bars: median to p90")
    ax.set_ylabel(f"dev {metric_name}")
    ax.set_title(
        f"{profile['name']}: {profile['device']}, {entry.get('threads') or profile['threads']} thread(s), "
        f"{profile['runtime']}, batch {profile['batch_size']} x {profile['seq_len']} tokens",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    place_labels(ax, points, colors)  # last: the axes' limits and layout are final
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def profile_table(entry: dict[str, Any], metric_name: str, budget_stat: str) -> list[str]:
    """One line per candidate of every method, fastest first."""
    rows = entry.get("rows") or []
    front = pareto_front(rows, "median")
    chosen = ((entry.get("selection") or {}).get("row") or {}).get("candidate")
    lines = [
        f"| candidate | method | layers | heads | FFN | dev {metric_name} | latency median (ms) | p90 (ms) "
        "| seq/s | params (M) | GFLOPs/seq | file (MB) | peak mem (MiB) | Pareto | within budget |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|",
    ]
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["latency_median_ms"], -rows[i]["metric"]))
    for i in order:
        r = rows[i]
        name = f"**{r['candidate']}** ★" if r["candidate"] == chosen else r["candidate"]
        within = {True: "yes", False: "no", None: "–"}[r.get("fits")]
        cells = [
            name,
            r["method"],
            _fmt(r.get("layers"), "d"),
            _fmt(r.get("heads"), "d"),
            _fmt(r.get("intermediate"), "d"),
            f"{r['metric']:.4f}",
            f"{r['latency_median_ms']:.3f}",
            f"{r['latency_p90_ms']:.3f}",
            _fmt(r.get("sequences_per_s"), ".1f"),
            f"{r['params'] / 1e6:.2f}",
            f"{r['gflops_per_seq']:.3f}",
            _fmt(r.get("file_mb"), ".1f"),
            _fmt(r.get("memory_mb"), ".1f"),
            "●" if front[i] else "",
            within,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def equal_layers_table(entry: dict[str, Any], metric_name: str) -> list[str]:
    """Candidates of different methods with as many layers, side by side (empty with one method)."""
    rows = entry.get("rows") or []
    by_layers: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:  # a model without transformer layers (AdaBERT's cells) has no row here
        if r.get("layers") is not None:
            by_layers.setdefault(r["layers"], []).append(r)
    groups = [g for _, g in sorted(by_layers.items(), key=lambda kv: -kv[0]) if len(methods_of(g)) > 1]
    if not groups:
        return []
    lines = [
        f"| candidate | layers | method | dev {metric_name} | latency median (ms) | p90 (ms) | params (M) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for group in groups:
        for r in sorted(group, key=lambda r: (r["method"], -r["params"])):
            lines.append(
                f"| {r['candidate']} | {r['layers']} | {r['method']} | {r['metric']:.4f} | "
                f"{r['latency_median_ms']:.3f} | {r['latency_p90_ms']:.3f} | {r['params'] / 1e6:.2f} |"
            )
    return lines


def render(results: dict[str, Any], out_dir: Path) -> str:
    """Write one PNG per measured profile into ``out_dir`` and return the Markdown report embedding them."""
    metric_name = results.get("main_metric", "score")
    protocol = results.get("protocol", {})
    stat = protocol.get("budget_stat", "p90")
    sources = results.get("sources") or {}
    lines = [
        f"# Per-hardware evaluation: {results.get('task', '?')}",
        "",
        "Methods: " + ", ".join(f"{m} (`{sources.get(m, '?')}`)" for m in results.get("methods", [])) + ". "
        f"Every candidate is measured the same way: dev {metric_name} once, on the same dev data;",
        f"latency: {protocol.get('warmup', '?')} warm-up calls, then {protocol.get('repeats', '?')} timed "
        "calls per candidate in interleaved rounds, threads pinned to the profile. Budgets apply to the "
        f"latency {stat}. Peak memory: {protocol.get('memory', 'see dynaflow.evaluation.harness')}.",
    ]
    if checkpoints := results.get("checkpoints"):
        lines.append("Checkpoints chosen on: " + "; ".join(f"{m}: {c}" for m, c in checkpoints.items()) + ".")
    if results.get("quality"):
        lines.append(f"Quality floor for shipping: {results['quality']}.")
    lines.append("")
    for entry in results.get("profiles", []):
        p = entry["profile"]
        lines += [f"## Profile `{p['name']}`", ""]
        threads = entry.get("threads") or p["threads"]
        lines.append(
            f"{p['device']}, {threads} thread(s), {p['runtime']}, batch {p['batch_size']}, "
            f"sequence length {p['seq_len']}; budget: {(entry.get('selection') or {}).get('budget', 'none')}."
        )
        if entry["status"] != "measured":
            lines += [
                "",
                f"**Skipped** on `{(entry.get('machine') or {}).get('host', 'this machine')}`: "
                f"{entry.get('note')}.",
                "",
            ]
            continue
        m = entry.get("machine") or {}
        lines.append(
            f"Measured on `{m.get('host', '?')}`: {m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs"
            + (f", GPU {', '.join(m['cuda'])}" if m.get("cuda") else "")
            + f"; torch {m.get('torch', '?')}, onnxruntime {m.get('onnxruntime', '?')}."
        )
        busy = entry.get("foreign_load_cores")
        if busy is not None and busy > BUSY_CORES:
            lines += [
                "",
                f"**Warning:** other processes kept {busy:.2f} cores busy during this measurement; "
                "its latencies are inflated. Measure on an idle machine.",
            ]
        sel = entry.get("selection") or {}
        if sel:
            loud = "**" if sel.get("status") == "below_quality" else ""
            lines += ["", f"**Selection:** {loud}{sel.get('message', 'none')}{loud}"]
        if entry.get("export"):
            lines.append(f"Exported to `{entry['export']}`.")
        lines += ["", f"![{p['name']}: dev {metric_name} vs latency]({plot_file(p['name'])})", ""]
        pareto_plot(entry, metric_name, out_dir / plot_file(p["name"]), stat, results.get("reference"))
        lines += profile_table(entry, metric_name, stat)
        lines.append("")
        same = equal_layers_table(entry, metric_name)
        if same:
            lines += ["Methods side by side at equal depth (same protocol):", "", *same, ""]
    return "\n".join(lines)


def write_report(results: dict[str, Any], out_dir: Path) -> Path:
    """``report.md`` and the plots in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_FILE
    atomic_write_bytes(path, render(results, out_dir).encode())
    return path


def report_key(results: dict[str, Any]) -> str:
    """What a report is made of: the results and the code that renders them (a key for skipping a rebuild)."""
    code = {m.__name__: file_digest(Path(m.__file__)) for m in (plots, selection)}
    code[__name__] = file_digest(Path(__file__))
    blob = json.dumps({"results": results, "code": code}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_results(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Results from ``results.json`` files or directories holding one."""
    out = []
    for path in paths:
        path = Path(path)
        file = path / RESULTS_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no evaluation results (run `dynaflow run` first)")
        doc = json.loads(file.read_text())
        if doc.get("version") != 2:
            raise ValueError(
                f"{file}: results of an older dynaflow (version {doc.get('version')}); re-run it"
            )
        out.append(doc)
    return out


def merge_results(results: Sequence[dict[str, Any]], keep_selection: bool = False) -> dict[str, Any]:
    """One result set from several: each method's measurements (and profiles measured on other machines).

    Per profile and method, a measured entry replaces a skipped one and a later measured entry an earlier
    one; the profile's rows are then every method's rows together. Selection and export are dropped (they
    are made over the merged rows) unless ``keep_selection`` and all of a profile's rows come from one
    result set, whose selection and export then stay. Task and protocol come from the first result.
    """
    if not results:
        raise ValueError("no results to merge")
    merged = {k: v for k, v in results[0].items() if k != "profiles"}
    merged["methods"] = list(dict.fromkeys(m for r in results for m in r.get("methods", [])))
    merged["sources"] = {k: v for r in results for k, v in (r.get("sources") or {}).items()}
    merged["checkpoints"] = {k: v for r in results for k, v in (r.get("checkpoints") or {}).items()}
    parts: dict[str, dict[str, tuple[int, dict[str, Any]]]] = {}  # profile -> method -> (source, entry)
    for source, result in enumerate(results):
        for entry in result.get("profiles", []):
            name = entry["profile"]["name"]
            methods = methods_of(entry.get("rows") or []) or ["?"]
            for method in methods:
                rows = [r for r in entry.get("rows") or [] if r["method"] == method]
                have = parts.setdefault(name, {}).get(method)
                if have is None or entry["status"] == "measured" or have[1]["status"] != "measured":
                    parts[name][method] = (source, dict(entry, rows=rows))
    profiles = []
    for pieces in parts.values():
        measured = [(s, p) for s, p in pieces.values() if p["status"] == "measured"]
        base = dict((measured or list(pieces.values()))[0][1])
        base["rows"] = [r for _, p in measured for r in p["rows"]]
        if not (keep_selection and len({s for s, _ in measured}) == 1):
            base["selection"], base["export"] = None, None
        profiles.append(base)
    merged["profiles"] = profiles
    return merged
