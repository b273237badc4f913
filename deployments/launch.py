"""Start the application on the host and port of the settings (SERVER_HOST / SERVER_PORT / args).

`serve run serve_config.yaml` takes the address from the YAML; this launcher is for those who
configure through the environment, like the EdgeAcc-SGLang image:

    MODEL_PATH=/models/qwen3 SERVER_PORT=30000 python -m deployments.launch [serve_config.yaml]

Runs until Ctrl-C, then shuts Serve down.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import yaml


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "config", nargs="?", help="a serve_config.yaml whose first application's args to use"
    )
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: start a local one)"
    )
    opts = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from edgeacc_ray.config import ConfigError, ServeConfig

    args: dict = {}
    if opts.config:
        with open(opts.config) as f:
            doc = yaml.safe_load(f) or {}
        apps = doc.get("applications") or [{}]
        args = dict(apps[0].get("args") or {})
    try:
        cfg = ServeConfig.from_sources(args)
    except ConfigError as exc:
        sys.exit(str(exc))

    import ray
    from ray import serve

    from deployments.app import build_app

    ray.init(address=opts.address, namespace="serve")
    if cfg.http_server == "ingress":  # the Ingress replicas listen on host:port themselves
        serve.start(proxy_location="Disabled")
    else:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(args), name="edgeacc", route_prefix="/")
    print(
        f"EdgeAcc-Ray serving {cfg.model_name!r} on http://{cfg.host}:{cfg.port} (Ctrl-C to stop)",
        flush=True,
    )
    stop = False

    def _stop(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    while not stop:
        time.sleep(0.5)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
