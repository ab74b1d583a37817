"""From a trained DynaBERT folder to a ready :class:`~dynaflow.serving.app.Engine`.

The serving profile (each sub-network's latency model on this machine, runtime and thread count) is measured
at startup and kept in ``<cache>/profile-<runtime>-t<threads>.json``; it is reused while the model's files,
the machine, the runtime, the threads and the longest request length are the same, and measured again
otherwise. Dev scores come from the distillation stage's ``grid.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from dynaflow.config import ConfigError, ServeConfig
from dynaflow.core.artifacts import file_digest
from dynaflow.core.errors import DynaflowError
from dynaflow.evaluation.machine import machine_identity
from dynaflow.serving.actuators import Actuator, ElasticActuator, OrtActuator, parse_subnet, timing_run
from dynaflow.serving.app import Engine, ServeSettings
from dynaflow.serving.policy import make_policy
from dynaflow.serving.profile import ServingProfile, SubnetProfile, fit_latency, profile_points, time_subnet

log = logging.getLogger(__name__)

GRID_FILE = "grid.json"


class ServeError(DynaflowError):
    """The model folder, its scores or the serving settings cannot be used; the message says which."""


def grid_scores(model_dir: Path) -> dict[str, float]:
    path = model_dir / GRID_FILE
    if not path.is_file():
        raise ServeError(
            f"{path}: no grid.json; serve a folder the depth_kd stage wrote (run `dynaflow run`)"
        )
    try:
        grid = json.loads(path.read_text())
        scores = {name: float(entry["score"]) for name, entry in grid.items()}
        for name in scores:
            parse_subnet(name)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ServeError(f"{path}: not a sub-network grid ({exc})") from None
    if not scores:
        raise ServeError(f"{path}: the grid is empty")
    return scores


def model_digest(model_dir: Path) -> str:
    """Of the files the profile depends on: the weights, the config and the grid's scores (each file's
    digest from the project's digest cache, so an unchanged model is not read again)."""
    h = hashlib.sha256()
    for name in sorted(p.name for p in model_dir.iterdir() if p.suffix in (".safetensors", ".json")):
        h.update(f"{name} {file_digest(model_dir / name)}\n".encode())
    return h.hexdigest()[:16]


def profile_identity(max_length: int) -> dict[str, Any]:
    """What a profile was measured on besides the model: this machine, and the longest request."""
    return {**machine_identity(), "max_length": max_length}


def measure_profile(
    actuator: Actuator, scores: dict[str, float], metric: str, threads: int, max_length: int, source: str
) -> ServingProfile:
    from tqdm import tqdm

    subnets = []
    for name in tqdm(sorted(scores), desc=f"serving profile ({actuator.runtime}, {threads} thread(s))"):
        samples, p90 = time_subnet(timing_run(actuator, name), profile_points(max_length))
        base, per_token, error = fit_latency(samples)
        width, depth = parse_subnet(name)
        subnets.append(SubnetProfile(name, width, depth, scores[name], base, per_token, error, p90))
    identity = profile_identity(max_length)
    return ServingProfile(tuple(subnets), metric, actuator.runtime, threads, identity, source)


def load_or_measure_profile(
    actuator: Actuator, scores: dict[str, float], source: str, cache_dir: Path, metric: str, threads: int,
    max_length: int,
) -> ServingProfile:  # fmt: skip
    """The profile cached in ``cache_dir`` if it was measured on model ``source`` (its digest) with these
    sub-networks, on this machine and length; else measured now and cached."""
    path = cache_dir / f"profile-{actuator.runtime}-t{threads}.json"
    if path.is_file():
        try:
            cached = ServingProfile.load(path)
            same_machine = cached.machine == profile_identity(max_length)
            if cached.source == source and same_machine and {s.name for s in cached.subnets} == set(scores):
                log.info("serving profile from %s", path)
                return cached
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable serving profile (%s); measuring again", path, exc)
    profile = measure_profile(actuator, scores, metric, threads, max_length, source)
    profile.save(path)
    return profile


def make_actuator(model: Any, runtime: str, threads: int, subnets: list[str], cache_dir: Path) -> Actuator:
    if runtime == "torch":
        return ElasticActuator(model, threads)
    return OrtActuator(model, subnets, threads, cache_dir / "onnx")


def build_engine(model_dir: Path, data_dir: Path, cfg: ServeConfig, cache_dir: Path) -> Engine:
    """The engine for ``model_dir`` (the depth_kd stage's output; ``data_dir``: the data stage's, for the
    task's labels and longest sequence), its serving profile measured or reused from ``cache_dir``."""
    from transformers import AutoTokenizer

    from dynaflow.data.glue import get_task
    from dynaflow.data.splits import read_task_meta
    from dynaflow.evaluation.export import label_names
    from dynaflow.models.backbone import load_elastic

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ServeError(f"{model_dir}: no trained model (config.json missing); run `dynaflow run` first")
    try:
        data_meta = read_task_meta(data_dir)
    except FileNotFoundError as exc:
        raise ServeError(str(exc)) from None
    max_length = int(data_meta["max_seq_length"])
    scores = grid_scores(model_dir)
    model = load_elastic(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    source = model_digest(model_dir)
    digest_dir = cache_dir / source
    actuator = make_actuator(model, cfg.runtime, cfg.threads, sorted(scores), digest_dir)
    metric = data_meta.get("main_metric", "score")
    profile = load_or_measure_profile(actuator, scores, source, digest_dir, metric, cfg.threads, max_length)
    slo = cfg.slo_ms / 1000 if cfg.slo_ms else 2 * profile.full.p90_single_s
    try:
        policy = make_policy(cfg.policy, profile, slo, cfg.max_batch, cfg.margin_ms / 1000)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"serve.policy = {cfg.policy!r}: {exc}") from None
    settings = ServeSettings(
        slo=slo, max_batch=cfg.max_batch, late=cfg.late, max_queue=cfg.max_queue, max_length=max_length,
        labels=tuple(label_names(data_meta) or ()), pair_task=get_task(data_meta["task"]).has_text_pair,
    )  # fmt: skip
    return Engine(actuator, tokenizer, profile, policy, settings)


def build_app(model_dir: Path, data_dir: Path, cfg: ServeConfig, cache_dir: Path) -> Any:
    """The FastAPI app around a new engine: what each Ray Serve replica builds for itself."""
    from dynaflow.serving.app import create_app

    return create_app(build_engine(model_dir, data_dir, cfg, cache_dir))
