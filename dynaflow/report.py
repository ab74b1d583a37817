"""The evaluation report: per hardware profile a table and a metric-vs-latency plot with the Pareto front.

Everything here works from the stored results (``results.json`` written by the evaluate stage, or by the
per-profile flow on another machine), so ``dynaflow report`` can rebuild the report, merging results
measured on several machines, without a model or the hardware.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dynaflow import plots, selection
from dynaflow.artifacts import atomic_file, atomic_write_bytes, file_digest
from dynaflow.plots import plt
from dynaflow.selection import latency_key, pareto_front, point_name

BUSY_CORES = 0.25  # warn when other processes used more cores than this during a measurement

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"


def plot_file(profile: str) -> str:
    return f"pareto_{profile}.png"


def plot_points(entry: dict[str, Any], stat: str = "median") -> list[dict[str, Any]]:
    """The points the profile's plot draws: one per measured grid point, with front and selection flags."""
    rows = entry.get("rows") or []
    front = pareto_front(rows, stat)
    chosen = (entry.get("selection") or {}).get("row") or {}
    key = latency_key(stat)
    return [
        {
            "name": point_name(r),
            "width": r["width"],
            "depth": r["depth"],
            "latency_ms": r[key],
            "metric": r["metric"],
            "on_front": on,
            "selected": bool(chosen) and (r["width"], r["depth"]) == (chosen["width"], chosen["depth"]),
        }
        for r, on in zip(rows, front, strict=True)
    ]


def pareto_plot(entry: dict[str, Any], metric_name: str, path: Path, budget_stat: str = "p90") -> None:
    """Dev metric against median latency; the front joined by a line, the selection starred, the budget."""
    points = plot_points(entry, "median")
    profile = entry["profile"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    others = [p for p in points if not p["on_front"]]
    front = sorted((p for p in points if p["on_front"]), key=lambda p: p["latency_ms"])
    ax.scatter([p["latency_ms"] for p in others], [p["metric"] for p in others], color="0.6", s=28,
               label="dominated", zorder=2)  # fmt: skip
    ax.plot([p["latency_ms"] for p in front], [p["metric"] for p in front], "o-", color="tab:blue", ms=6,
            label="Pareto front", zorder=3)  # fmt: skip
    for p in points:
        ax.annotate(f"{p['width']:g}/{p['depth']:g}", (p["latency_ms"], p["metric"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")  # fmt: skip
    chosen = [p for p in points if p["selected"]]
    if chosen:
        ax.scatter([chosen[0]["latency_ms"]], [chosen[0]["metric"]], marker="*", s=260, color="tab:red",
                   zorder=4, label=f"selected ({chosen[0]['name']})")  # fmt: skip
    for r in entry.get("comparison_rows") or []:  # other methods' models, beside the grid
        ax.scatter([r["latency_median_ms"]], [r["metric"]], marker="D", s=60, color="tab:green", zorder=4,
                   label=f"{r['method']} ({r['layers']} layers)")  # fmt: skip
        ax.annotate(point_name(r), (r["latency_median_ms"], r["metric"]), fontsize=7, color="tab:green",
                    xytext=(3, -10), textcoords="offset points")  # fmt: skip
    if profile.get("latency_ms") is not None:
        ax.axvline(profile["latency_ms"], color="tab:red", ls="--", lw=1,
                   label=f"budget ({budget_stat} ≤ {profile['latency_ms']:g} ms)")  # fmt: skip
    ax.set_xlabel("latency per batch, median (ms)")
    ax.set_ylabel(f"dev {metric_name}")
    ax.set_title(
        f"{profile['name']}: {profile['device']}, {entry.get('threads') or profile['threads']} thread(s), "
        f"{profile['runtime']}, batch {profile['batch_size']} x {profile['seq_len']} tokens",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", title="point labels: width/depth", title_fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def profile_table(entry: dict[str, Any], metric_name: str, budget_stat: str) -> list[str]:
    """One line per sub-network, fastest first; other methods' models after them (off the front)."""
    rows = entry.get("rows") or []
    front = pareto_front(rows, "median")
    chosen = (entry.get("selection") or {}).get("row") or {}
    others = entry.get("comparison_rows") or []
    lines = [
        f"| sub-network | width | depth | dev {metric_name} | latency median (ms) | p90 (ms) | seq/s "
        "| params (M) | GFLOPs/seq | file (MB) | peak mem (MiB) | Pareto | within budget |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|",
    ]
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["latency_median_ms"], -rows[i]["metric"]))
    for i, r in [(i, rows[i]) for i in order] + [(None, r) for r in others]:
        name = point_name(r)
        if i is not None and chosen and point_name(chosen) == name:
            name = f"**{name}** ★"
        within = {True: "yes", False: "no", None: "–"}[r.get("fits")]
        cells = [
            name, f"{r['width']:g}", f"{r['depth']:g}", f"{r['metric']:.4f}", f"{r['latency_median_ms']:.3f}",
            f"{r['latency_p90_ms']:.3f}", _fmt(r.get("sequences_per_s"), ".1f"), f"{r['params'] / 1e6:.2f}",
            f"{r['gflops_per_seq']:.3f}", _fmt(r.get("file_mb"), ".1f"), _fmt(r.get("memory_mb"), ".1f"),
            "–" if i is None else "●" if front[i] else "", within,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def equal_depth_table(entry: dict[str, Any], metric_name: str) -> list[str]:
    """Each other method's model next to the DynaBERT sub-networks with as many layers."""
    lines = [
        f"| model | layers | width | dev {metric_name} | latency median (ms) | p90 (ms) | params (M) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for other in entry.get("comparison_rows") or []:
        peers = sorted((r for r in entry.get("rows") or [] if r["layers"] == other["layers"]),
                       key=lambda r: -r["width"])  # fmt: skip
        for r in [other, *peers]:
            lines.append(
                f"| {point_name(r)} | {r['layers']} | {r['width']:g} | {r['metric']:.4f} | "
                f"{r['latency_median_ms']:.3f} | {r['latency_p90_ms']:.3f} | {r['params'] / 1e6:.2f} |"
            )
    return lines


def render(results: dict[str, Any], out_dir: Path) -> str:
    """Write one PNG per measured profile into ``out_dir`` and return the Markdown report embedding them."""
    metric_name = results.get("main_metric", "score")
    protocol = results.get("protocol", {})
    stat = protocol.get("budget_stat", "p90")
    lines = [
        f"# Per-hardware evaluation: {results.get('task', '?')}",
        "",
        f"Model: `{results.get('model', '?')}`; widths {results.get('widths')} × depths "
        f"{results.get('depths')}; dev {metric_name} computed once per sub-network, on the extracted model.",
        f"Latency: {protocol.get('warmup', '?')} warm-up calls, then {protocol.get('repeats', '?')} timed "
        "calls per sub-network in interleaved rounds; threads pinned to the profile. Budgets apply to the "
        f"latency {stat}. Peak memory: {protocol.get('memory', 'see dynaflow.hardware')}.",
        "",
    ]
    for entry in results.get("profiles", []):
        p = entry["profile"]
        lines.append(f"## Profile `{p['name']}`")
        lines.append("")
        threads = entry.get("threads") or p["threads"]
        lines.append(
            f"{p['device']}, {threads} thread(s), {p['runtime']}, batch {p['batch_size']}, "
            f"sequence length {p['seq_len']}; budget: {(entry.get('selection') or {}).get('budget', 'none')}."
        )
        if entry["status"] != "measured":
            lines += ["", f"**Skipped** on `{(entry.get('machine') or {}).get('host', 'this machine')}`: "
                      f"{entry.get('note')}.", ""]  # fmt: skip
            continue
        m = entry.get("machine") or {}
        lines.append(
            f"Measured on `{m.get('host', '?')}`: {m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs"
            + (f", GPU {', '.join(m['cuda'])}" if m.get("cuda") else "")
            + f"; torch {m.get('torch', '?')}, onnxruntime {m.get('onnxruntime', '?')}."
        )
        busy = entry.get("foreign_load_cores")
        if busy is not None and busy > BUSY_CORES:
            lines += ["", f"**Warning:** other processes kept {busy:.2f} cores busy during this measurement; "
                      "its latencies are inflated. Measure on an idle machine."]  # fmt: skip
        sel = entry.get("selection") or {}
        lines += ["", f"**Selection:** {sel.get('message', 'none')}"]
        if entry.get("export"):
            lines.append(f"Exported to `{entry['export']}`.")
        lines += ["", f"![{p['name']}: dev {metric_name} vs latency]({plot_file(p['name'])})", ""]
        pareto_plot(entry, metric_name, out_dir / plot_file(p["name"]), stat)
        lines += profile_table(entry, metric_name, stat)
        lines.append("")
        if entry.get("comparison_rows"):
            lines += ["Other methods beside the DynaBERT sub-networks of equal depth (same protocol):", ""]
            lines += [*equal_depth_table(entry, metric_name), ""]
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
            raise FileNotFoundError(f"{file}: no evaluation results (run `dynaflow stage evaluate` first)")
        out.append(json.loads(file.read_text()))
    return out


def merge_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result set from several (e.g. the local run plus profiles measured on other machines).

    Profiles are matched by name: a measured entry replaces a skipped one, and a later measured entry an
    earlier one. Grid, task and protocol come from the first DynaBERT result. Results of other methods
    (``method``, e.g. ``theseus``) add their rows to the same profile's ``comparison_rows``.
    """
    if not results:
        raise ValueError("no results to merge")
    grids = [r for r in results if r.get("method", "dynabert") == "dynabert"]
    merged = dict(grids[0] if grids else results[0])
    profiles: dict[str, dict[str, Any]] = {}
    for result in grids:
        for entry in result.get("profiles", []):
            name = entry["profile"]["name"]
            if (
                name not in profiles
                or entry["status"] == "measured"
                or profiles[name]["status"] != "measured"
            ):
                profiles[name] = entry
    for result in results:
        if result.get("method", "dynabert") == "dynabert":
            continue
        for entry in result.get("profiles", []):
            name = entry["profile"]["name"]
            if entry["status"] != "measured":
                continue
            base = profiles.setdefault(name, dict(entry, rows=[], selection=None, export=None))
            base["comparison_rows"] = [*(base.get("comparison_rows") or []), *entry["rows"]]
    merged["profiles"] = list(profiles.values())
    merged["compared"] = sorted({r.get("method", "dynabert") for r in results} - {"dynabert"})
    return merged
