"""Targets of a benchmark run: servers given by URL, or launched from a shell command.

Spec forms (`--targets`): `NAME=URL`, `NAME=cmd:COMMAND` (URL taken from `--host`/`--port` in the
command, default http://127.0.0.1:8000), or `NAME=URL,cmd:COMMAND`. A launched server runs in its
own process group, is waited for until /v1/models answers, and is stopped with SIGINT (then SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import httpx

READY_TIMEOUT_S = 600.0
URL_READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Target:
    """A named server under test, with the command that starts it when we launch it ourselves."""

    name: str
    url: str
    command: str | None = None


def _url_from_command(command: str) -> str:
    """http://HOST:PORT from `--host`/`--port` flags of a server command line."""
    host, port = "127.0.0.1", "8000"
    words = shlex.split(command)
    for flag, value in zip(words, words[1:]):
        if flag == "--host":
            host = "127.0.0.1" if value == "0.0.0.0" else value
        elif flag == "--port":
            port = value
    return f"http://{host}:{port}"


def parse_target(spec: str) -> Target:
    """Parse one `--targets` spec (forms in the module docstring)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"target {spec!r} is not NAME=URL or NAME=cmd:COMMAND")
    if rest.startswith("cmd:"):
        command = rest[4:]
        return Target(name, _url_from_command(command), command)
    url, sep, command = rest.partition(",cmd:")
    return Target(name, url.rstrip("/"), command if sep else None)


def wait_ready(
    url: str, timeout: float = READY_TIMEOUT_S, proc: subprocess.Popen | None = None
) -> None:
    """Block until GET {url}/v1/models answers 200; fail early if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"server for {url} exited with code {proc.returncode} before it was ready"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/v1/models", timeout=5.0).status_code == 200:
                return
        time.sleep(1.0)
    raise TimeoutError(f"{url}/v1/models did not answer within {timeout:.0f} s")


def wait_gone(url: str, timeout: float = STOP_TIMEOUT_S) -> None:
    """Block until nothing answers at `url` (a server stopped before may still be shutting down: a
    new one on the same port would otherwise look ready while the old one answers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/v1/models", timeout=2.0)
        except httpx.HTTPError:
            return
        time.sleep(1.0)
    raise TimeoutError(f"{url} still answers {timeout:.0f} s after its server was stopped")


def stop(proc: subprocess.Popen) -> None:
    """SIGINT the process group, then SIGKILL it if it is still there after STOP_TIMEOUT_S."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def running(targets: Sequence[Target], log_dir: Path) -> Iterator[None]:
    """Start every target that has a command (logs in `log_dir/NAME.server.log`), wait until all
    answer, and stop the launched ones on exit."""
    procs: list[subprocess.Popen] = []
    try:
        for t in targets:
            if t.command:
                wait_gone(t.url)
                log = open(log_dir / f"{t.name}.server.log", "ab")
                procs.append(
                    subprocess.Popen(
                        t.command,
                        shell=True,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
                log.close()
        launched = iter(procs)
        for t in targets:
            if t.command:
                wait_ready(t.url, READY_TIMEOUT_S, next(launched))
            else:
                wait_ready(t.url, URL_READY_TIMEOUT_S)
        yield
    finally:
        for proc in procs:
            stop(proc)
