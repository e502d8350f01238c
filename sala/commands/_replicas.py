"""`sala serve --replicas N`: the server's engine replicated over Ray Serve (one GPU per replica when CUDA is
available), one OpenAI-compatible endpoint with prefix-aware routing. See docs/replicas.md."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import signal
import sys
import time


def add_replica_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("replicas (Ray Serve; needs the ray extra: pip install 'sala-lm[ray]')")
    g.add_argument("--replicas", type=int, default=0,
                   help="serve N engine replicas on Ray Serve behind one endpoint, routed by prefix-cache "
                        "affinity (default 0: one engine in this process, no Ray)")
    g.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica (default 1)")
    g.add_argument("--replica-gpus", type=float, default=None,
                   help="GPUs per replica (default: 1 when CUDA is available, else 0)")
    g.add_argument("--max-inflight-per-replica", type=int, default=32,
                   help="a replica with this many requests in flight is skipped by prefix affinity")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster ('auto': the running one) instead of starting a local one")


def add_generate_replica_args(p) -> None:
    """`sala generate` flags for --input/--output over replicas."""
    p.add_argument("--replicas", type=int, default=0,
                   help="with --input: spread the prompts over N engine replicas (Ray actors, one GPU each when "
                        "CUDA is available); needs the ray extra")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica with --replicas (default 1)")
    p.add_argument("--replica-gpus", type=float, default=None,
                   help="GPUs per replica with --replicas (default: 1 with CUDA, else 0)")


def run_replicas(args: argparse.Namespace, engine_kwargs: dict) -> int:
    """Start (or join) Ray, run the Serve application on host:port, and block until interrupted."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        print("sala serve: error: --replicas needs the ray extra (missing ray[serve]): pip install 'sala-lm[ray]'",
              file=sys.stderr)
        return 1
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    if args.replica_cpus < 0 or (args.replica_gpus is not None and args.replica_gpus < 0):
        raise ValueError(f"--replica-cpus / --replica-gpus must be >= 0, got {args.replica_cpus} / "
                         f"{args.replica_gpus}")
    if engine_kwargs.get("device"):
        raise ValueError("--device does not go with --replicas: each replica uses its own GPU (or the CPU)")
    import ray
    from ray import serve

    from sala.serve.replicas import APP_NAME, build

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not ray.is_initialized():
        ray.init(address=args.ray_address, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build(args.model, replicas=args.replicas, replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus,
                engine_kwargs=engine_kwargs, served_model_name=args.served_model_name, api_key=args.api_key,
                max_inflight=args.max_inflight_per_replica)
    serve.run(app, name=APP_NAME, route_prefix="/")
    print(f"sala serve: {args.model} x {args.replicas} replicas on http://{args.host}:{args.port}/v1 "
          "(Ctrl-C to stop)", file=sys.stderr)
    def stop(signum, frame):                   # a container's or supervisor's stop: shut Serve down cleanly
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0
