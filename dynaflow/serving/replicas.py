"""Scale-out on Ray Serve: N replicas of the same app, each with its own engine (queue, scheduler, worker).

Ray Serve's proxy spreads requests over the replicas (power of two choices on their queue lengths); inside a
replica the dynaflow scheduler batches and picks the sub-network exactly as a single server does. Each replica
builds its engine from the same folder; the serving profile is measured once, by the caller, before Ray starts
(replicas measuring at the same time would slow each other down and record it). ``/metrics`` through the proxy
answers from whichever replica takes the request: scrape replicas one by one, or use Ray's own metrics.

Ray is an optional dependency: ``pip install 'dynaflow[ray]'``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dynaflow.core.errors import DynaflowError


def ray_serve() -> Any:
    try:
        from ray import serve
    except ImportError:
        raise DynaflowError(
            "serve.replicas > 1 runs on Ray Serve, which is not installed: pip install 'dynaflow[ray]'"
        ) from None
    return serve


def replicated(build_app: Callable[[], Any], replicas: int, cpus_per_replica: float, max_ongoing: int) -> Any:
    """A Ray Serve application of ``replicas`` copies of ``build_app()`` (a FastAPI app, built in each
    replica). ``max_ongoing`` must admit a batch's worth of requests per replica: Ray's default (5) would
    starve the scheduler of requests to batch."""
    serve = ray_serve()

    def builder() -> Any:  # a plain function: Ray Serve takes other callables (a partial) for ASGI apps
        return build_app()

    @serve.deployment(
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing,
        ray_actor_options={"num_cpus": cpus_per_replica},
    )
    @serve.ingress(builder)
    class ElasticBertServer:
        pass

    return ElasticBertServer.bind()


def run_replicated(app: Any, host: str, port: int, cpus: int, blocking: bool = True) -> None:
    """Start a local Ray (``cpus`` CPUs) and Serve on ``host:port``, then deploy ``app`` at ``/``."""
    import ray

    serve = ray_serve()
    if not ray.is_initialized():
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, route_prefix="/", blocking=blocking)


def shutdown() -> None:
    import ray

    serve = ray_serve()
    serve.shutdown()
    ray.shutdown()
