"""The models cache: where built or converted model folders live, and how one is published safely.

Several processes (Ray workers, test runs) may ask for the same folder at once; each folder is made
under a file lock in a temporary sibling that is renamed into place when complete, so no one ever
sees a half-written folder and the work happens once. A stamp file, written last, records what the
folder was made from (recipe version, source): a folder whose stamp differs is made again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

STAMP = ".edgeacc_stamp.json"


def cache_dir() -> Path:
    """Where cached models live: `$EDGEACC_CACHE_DIR`, else `~/.cache/edgeacc_ray/models`."""
    env = os.environ.get("EDGEACC_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgeacc_ray" / "models"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive fcntl lock on `path`, held for the `with` block (also between processes)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_stamped(folder: Path, stamp: dict[str, Any]) -> bool:
    """Whether `folder` is complete and was made as `stamp` says."""
    try:
        return json.loads((folder / STAMP).read_text()) == stamp
    except (OSError, ValueError):
        return False


def publish_folder(
    target: Path, stamp: dict[str, Any], write: Callable[[Path], None], force: bool = False
) -> Path:
    """Return `target`, first filling it with `write(tmp)` unless it already carries `stamp` (or `force`).

    `write` gets an empty temporary folder next to `target`; stamped, it is renamed into place
    (replacing a stale `target`) under the lock `.<name>.lock`, and removed if `write` raises.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if not force and is_stamped(target, stamp):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            write(tmp)
            (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
            tmp.chmod(0o755)  # mkdtemp makes it private; other users (Ray workers) must read it
            for path in tmp.iterdir():
                path.chmod(0o644)
            if target.exists():
                old = target.with_name(f"{tmp.name}.old")
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old)
            else:
                tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
