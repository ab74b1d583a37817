"""Screenshots of a finished project in each tool's own UI, for the README (docs/*.png).

    python docs/screenshots.py PROJECT [--out docs] [--browser /usr/bin/chromium]

Starts `mlflow ui` and `prefect server start` on the project's own stores, runs `dvc plots show`, and
photographs, in a headless Chromium driven by Playwright (`pip install playwright`; a browser from the
system's packages, e.g. `apt-get install chromium`, since Playwright's own download needs the internet):
the latest pipeline run in MLflow, the latest flow run in Prefect (its graph and artifacts), and DVC's
plots (rendered offline with `pip install vl-convert-python`). Nothing here is part of the pipeline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

ML = "workflowType=machine_learning"


def wait_for(url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} did not answer within {seconds:.0f} s") from None
            time.sleep(0.5)


def dvc_plots_page(project: Path, page: Path) -> None:
    """What `dvc plots show` draws, on one page that needs no network: DVC's own HTML loads Vega from a
    CDN, so the same Vega-Lite specs (`dvc plots show --json`) are rendered here with vl-convert."""
    import json

    import vl_convert

    shown = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=project,
                           check=True, capture_output=True, text=True)  # fmt: skip
    figures = [
        f"<figure><figcaption>{path}</figcaption>{vl_convert.vegalite_to_svg(plot['content'])}</figure>"
        for path, plots in json.loads(shown.stdout)["data"].items()
        for plot in plots
        if plot.get("type") == "vega"
    ]
    page.parent.mkdir(parents=True, exist_ok=True)
    style = "body{font-family:sans-serif;display:flex;flex-wrap:wrap;gap:12px} figure{margin:4px}"
    page.write_text(f"<html><head><style>{style}</style></head><body>{''.join(figures)}</body></html>")


def latest_mlflow_run(project: Path) -> tuple[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dynaflow")
    runs = client.search_runs(
        [experiment.experiment_id], "tags.driver = 'prefect'", order_by=["attributes.start_time DESC"]
    )
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return experiment.experiment_id, parents[0].info.run_id


def latest_flow_run(api: str) -> str:
    os.environ["PREFECT_API_URL"] = api
    from prefect.client.orchestration import get_client

    async def read() -> str:
        async with get_client() as client:
            runs = await client.read_flow_runs(limit=1, sort="START_TIME_DESC")
            return str(runs[0].id)

    return asyncio.run(read())


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("project", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--browser", default="/usr/bin/chromium")
    args = parser.parse_args()
    project, out = args.project.resolve(), args.out.resolve()
    env = {**os.environ, "PREFECT_HOME": str(project / ".prefect-home"), "PREFECT_UI_ENABLED": "true",
           "PREFECT_UI_API_URL": "http://127.0.0.1:4255/api"}  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    bin_dir, store = Path(sys.executable).parent, project / "mlflow.db"
    servers = [
        subprocess.Popen([bin_dir / "mlflow", "ui", "--backend-store-uri", f"sqlite:///{store}",
                          "--port", "5055"], cwd=project, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),  # fmt: skip
        subprocess.Popen([bin_dir / "prefect", "server", "start", "--port", "4255"], cwd=project, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),  # fmt: skip
    ]
    try:
        dvc_plots_page(project, project / "dvc_plots" / "offline.html")
        wait_for("http://127.0.0.1:5055/health")
        wait_for("http://127.0.0.1:4255/api/health")
        experiment, run = latest_mlflow_run(project)
        flow_run = latest_flow_run("http://127.0.0.1:4255/api")
        pages = {
            # MLflow 3 opens in its GenAI view until told otherwise (then remembers it in the browser).
            "mlflow_experiment.png": f"http://127.0.0.1:5055/#/experiments/{experiment}?{ML}",
            "mlflow_run.png": f"http://127.0.0.1:5055/#/experiments/{experiment}/runs/{run}?{ML}",
            "mlflow_charts.png": f"http://127.0.0.1:5055/#/experiments/{experiment}/runs/{run}/model-metrics?{ML}",
            "prefect_flow_run.png": f"http://127.0.0.1:4255/runs/flow-run/{flow_run}",
            "prefect_artifacts.png": f"http://127.0.0.1:4255/runs/flow-run/{flow_run}#Artifacts",
            "dvc_plots.png": (project / "dvc_plots" / "offline.html").as_uri(),
        }
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.browser, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            for name, url in pages.items():
                page.goto(url.removesuffix("#Artifacts"), wait_until="load")  # the UIs poll: never idle
                time.sleep(8)  # charts and graphs draw after their data arrives
                if url.endswith("#Artifacts"):  # a tab of the flow run page, chosen by clicking it
                    page.get_by_text("Artifacts", exact=True).first.click()
                    time.sleep(3)
                page.screenshot(path=str(out / name), full_page=name == "dvc_plots.png")
                print(f"{out / name}: {url}")
            browser.close()
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
