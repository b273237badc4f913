"""The Ingress replica as the HTTP endpoint itself (`http_server: ingress`).

Behind Serve's proxy, every request and every streamed chunk crosses one more process: the proxy
actor parses HTTP and forwards ASGI messages to the Ingress over Ray. On a 2-core box that hop's CPU
(~0.1 core at 64 streams) comes straight out of the engine's compute (README, "Where HTTP enters").
Here uvicorn runs on the replica's own event loop over the same ASGI app, on a socket bound with
SO_REUSEPORT, so every Ingress replica of a node shares host:port and the kernel spreads connections
among them. The app's lifespan is Serve's to run (it already ran it), so uvicorn's is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

logger = logging.getLogger("ray.serve")

BACKLOG = 2048  # connections the kernel holds before this replica accepts them (a flood's burst)


class PortTaken(RuntimeError):
    """host:port is held by a process that does not share it (Serve's proxy, or another server)."""


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port that other SO_REUSEPORT sockets of this user may share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortTaken(
            f"http_server='ingress' cannot listen on {host}:{port}: {exc.strerror}. If Serve's proxy "
            "holds it, set `proxy_location: Disabled` (serve_config.yaml does), or use "
            "http_server='proxy'"
        ) from None
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """Leave SIGINT and SIGTERM to Ray (uvicorn takes them over on the main thread)."""
        yield


class HttpListener:
    """uvicorn over `app` on this event loop, until `close()`."""

    def __init__(self, app, host: str, port: int, access_log: bool) -> None:
        self.sock = bind(host, port)
        config = uvicorn.Config(
            app,
            lifespan="off",
            access_log=access_log,
            log_level="warning",
            timeout_keep_alive=30,
        )
        self.server = _Server(config)
        self.address = f"http://{host}:{port}"
        self._task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        logger.info("Ingress serving HTTP on %s", self.address)

    def close(self) -> None:
        self.server.should_exit = True
