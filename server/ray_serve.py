"""The same OpenAI-compatible API as a Ray Serve application: one batched engine per replica.

    python -m server MODEL_DIR --ray --replicas 2 [--threads-per-replica 1] [--batch 4] [--port 8000]
    python -m server MODEL_DIR --ray --autoscale 1:4          # Ray adds replicas under load

Each replica loads its own `runtime.Engine` (its own onnxruntime threads, `num_cpus` = threads
in Ray's scheduler) behind a continuous batcher of --batch slots, as `python -m server` serves
it (runtime/serving.py: one decode step for the replica's running requests; --batch 0 or a
baseline variant: one request at a time), and serves the app `server.create_api` builds, as
the deployment's ingress:
every route, limit, error and the cancel-on-disconnect path are the single-process server's,
per replica (so N replicas hold N x (concurrency + queue_size) requests before answering 429).
Every response carries the replica that answered in the `x-bitnet-replica` header, and
GET /ray/replica describes that replica's recent generations and its batcher (for tests and
load runs).

Without RAY_ADDRESS a one-machine Ray cluster is started in this process; with it (e.g.
`ray start --head` here, `ray start --address HEAD:6379` on more machines) the app is deployed
onto that cluster. Note: Ray binds its services to the host's network address even when told
127.0.0.1; the tests and bench/bench_ray.py run it inside a network namespace of their own.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

from runtime.serving import DEFAULT_SLOTS

REPLICA_HEADER = "x-bitnet-replica"
APP_NAME = "bitnet"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Requests a replica accepts beyond what its gate holds: they are answered at once (429 from
# the full gate, /v1/health, /v1/models) instead of waiting in Ray's own queue.
HEADROOM = 4


@dataclass
class RayOptions:
    replicas: int = 1
    threads_per_replica: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas; None: fixed `replicas`
    batch: int = DEFAULT_SLOTS  # batcher slots per replica (0: one request at a time)

    def validate(self) -> None:
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 0:
            raise ValueError(f"--batch must be >= 0, got {self.batch}")
        if self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.replicas}")
        if self.threads_per_replica < 1:
            raise ValueError(f"--threads-per-replica must be >= 1, got {self.threads_per_replica}")
        if self.autoscale is not None:
            lo, hi = self.autoscale
            if lo < 0 or hi < 1 or lo > hi:
                raise ValueError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got {lo}:{hi}")


def parse_autoscale(text: str) -> tuple[int, int]:
    """'1:4' -> (1, 4); a one-line ValueError otherwise."""
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(lo), int(hi)
    except ValueError:
        raise ValueError(f"--autoscale takes MIN:MAX replicas, e.g. 1:4; got {text!r}") from None


class ReplicaHeader:
    """ASGI middleware: name the answering replica in every response's headers."""

    def __init__(self, app, replica: str):
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [(REPLICA_HEADER.encode(), self.replica)]
            await send(message)

        await self.app(scope, receive, send_with_header)


class ApiReplica:
    """One Ray Serve replica: an Engine behind its batcher, and the server's FastAPI app over it."""

    def __init__(self, model_dir: str, name: str, variant: str, threads: int, limits: dict,
                 batch: int = DEFAULT_SLOTS):
        from ray import serve

        self.engine = self.serve_engine(self.load_engine(model_dir, variant, threads), batch)
        self.name, self.limits, self.threads = name, limits, threads
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.max_batch_size = 0  # the largest decode step this replica ran
        if self.engine.batcher is not None:
            self.engine.batcher.step_observers.append(self._saw_step)

    def _saw_step(self, size: int) -> None:
        self.max_batch_size = max(self.max_batch_size, size)

    def load_engine(self, model_dir: str, variant: str, threads: int):
        from runtime import Engine

        return Engine(model_dir, variant=variant, threads=threads)

    def serve_engine(self, engine, batch: int):
        """The engine as the replica serves it: through a batcher of `batch` slots (the
        ternary variant), as `python -m server` does."""
        from runtime.serving import serving_engine

        return serving_engine(engine, batch)

    def __serve_build_asgi_app__(self):
        # Called by Ray Serve after __init__: the replica's ingress is the server's own app.
        from . import Limits, create_api

        app = create_api({self.name: self.engine}, limits=Limits(**self.limits))
        state = app.state.bitnet

        @app.get("/ray/replica")
        async def replica_info():
            return {"replica": self.replica, "pid": os.getpid(), "threads": self.threads,
                    "model": self.name, **state.gate.snapshot(),
                    "batcher": self.engine.batcher.stats() if self.engine.batcher is not None else None,
                    "max_batch_size": self.max_batch_size,
                    "jobs": [{"id": r.id, "state": r.state, "stopped_by": r.stopped_by,
                              "new_tokens": r.new_tokens, "tokens_after_cancel": r.tokens_after_cancel,
                              "finish_reason": r.finish_reason} for r in state.records()]}

        # the catch-all /v1/{rest} route comes first in create_api's router; /ray/... is outside it
        app.add_middleware(ReplicaHeader, replica=self.replica)
        return app


def build_app(model_dir: str, *, name: str | None = None, variant: str = "ternary",
              options: RayOptions | None = None, limits=None, replica_class=None):
    """The Ray Serve application (deploy with `serve.run(app, name=APP_NAME, route_prefix="/")`).
    replica_class: ApiReplica or a subclass (importable by the replicas)."""
    from ray import serve

    from . import Limits

    options = options or RayOptions()
    options.validate()
    limits = limits or Limits.for_batch(options.batch, variant)
    model_dir = os.path.abspath(model_dir)
    name = name or os.path.basename(os.path.normpath(model_dir))
    held = limits.concurrency + limits.queue_size
    config = dict(max_ongoing_requests=held + HEADROOM,
                  ray_actor_options={"num_cpus": options.threads_per_replica,
                                     "runtime_env": replica_runtime_env()})
    if options.autoscale is not None:
        lo, hi = options.autoscale
        config["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                        "initial_replicas": max(lo, 1),
                                        "target_ongoing_requests": limits.concurrency + 1}
    else:
        config["num_replicas"] = options.replicas
    deployment = serve.deployment(name="BitnetApi", **config)(serve.ingress()(replica_class or ApiReplica))
    return deployment.bind(model_dir, name, variant, options.threads_per_replica, limits.as_dict(), options.batch)


def app_builder(args: dict):
    """Ray Serve's application-builder form, for `serve run` and KubeRay's serveConfigV2:

        serve run server.ray_serve:app_builder model_dir=/models/x replicas=2
        # serveConfigV2: import_path: server.ray_serve:app_builder, args: {model_dir: ..., autoscale: "1:8"}

    args: model_dir (required), name, variant, replicas, threads_per_replica, autoscale ("MIN:MAX"),
    batch (slots per replica).
    """
    if not args.get("model_dir"):
        raise ValueError("app_builder needs model_dir=DIR (an exported model folder)")
    autoscale = args.get("autoscale")
    options = RayOptions(replicas=int(args.get("replicas", 1)),
                         threads_per_replica=int(args.get("threads_per_replica", 1)),
                         autoscale=parse_autoscale(str(autoscale)) if autoscale else None,
                         batch=int(args.get("batch", DEFAULT_SLOTS)))
    return build_app(args["model_dir"], name=args.get("name"), variant=args.get("variant", "ternary"),
                     options=options)


def replica_runtime_env() -> dict:
    """Replicas do not inherit this process's PYTHONPATH: point them at this checkout (the
    same path on every node of a multi-node cluster) and pass the API key, if any."""
    paths = [REPO_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    for var in ("BITNET_API_KEY", "BITNET_KERNEL", "BITNET_BUILD_DIR", "ORT_INCLUDE_DIR"):
        if os.environ.get(var):
            env[var] = os.environ[var]
    return {"env_vars": env}


def start(model_dir: str, *, name=None, variant="ternary", options: RayOptions | None = None,
          host: str = "127.0.0.1", port: int = 8000, limits=None, num_cpus: int | None = None,
          temp_dir: str | None = None, replica_class=None):
    """Connect to (RAY_ADDRESS) or start a Ray cluster, start Serve's HTTP proxy on host:port
    and deploy the app; returns once every replica is up."""
    import ray
    from ray import serve

    if variant == "ternary":  # build the custom-op library once here, not in every replica at once
        import custom_ops

        custom_ops.library_path()
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     object_store_memory=100 * 1024 * 1024, _temp_dir=temp_dir)
    serve.start(http_options={"host": host, "port": port})
    app = build_app(model_dir, name=name, variant=variant, options=options, limits=limits,
                    replica_class=replica_class)
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def main(args) -> int:
    """`python -m server DIR --ray ...` (args from server/__main__.py)."""
    try:
        options = RayOptions(replicas=args.replicas, threads_per_replica=args.threads_per_replica,
                             autoscale=parse_autoscale(args.autoscale) if args.autoscale else None,
                             batch=args.batch)
        options.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads is not None or args.page:
        print("error: with --ray use --threads-per-replica (not --threads); --page is not served by Ray",
              file=sys.stderr)
        return 2
    try:  # check the folder here, in one line, rather than in every replica's traceback
        from runtime.folder import variant_path

        variant_path(args.model_dir, args.variant)
    except Exception as e:  # noqa: BLE001 - EngineError / VariantNotFoundError: their message is the hint
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        importlib.import_module("ray.serve")
    except ImportError as e:
        print(f"error: --ray needs Ray Serve ({e}); install it with: pip install -r requirements-ray.txt",
              file=sys.stderr)
        return 2
    import signal
    import time

    url = start(args.model_dir, name=args.name, variant=args.variant, options=options,
                host=args.host, port=args.port)
    # after ray.init, which installs its own SIGTERM handler: stop like Ctrl-C, Serve shut down
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"serving on {url}/v1 (Ray Serve, app {APP_NAME!r}); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
        from ray import serve

        serve.shutdown()
    return 0
