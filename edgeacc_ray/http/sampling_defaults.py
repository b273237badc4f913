"""The model's own sampling defaults: what `generation_config.json` sets of temperature, top_p,
top_k, min_p and repetition_penalty is used for the fields an OpenAI request leaves out (vLLM's
`--generation-config auto`, its default). A field the model does not set keeps the neutral value
(temperature 1, no filtering, no penalty); SGLang's /generate keeps SGLang's own defaults."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

logger = logging.getLogger("ray.serve")

FILE = "generation_config.json"


class GenerationConfigError(ValueError):
    """The model's generation_config.json sets a sampling default this server cannot use."""


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k (generation_config's 0 means the same)
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def of_model(cls, folder: str | Path) -> SamplingDefaults:
        """The defaults of the model in `folder` (the neutral ones when it has no generation_config.json)."""
        path = Path(folder) / FILE
        if not path.is_file():
            return cls()
        found = cls._read(json.loads(path.read_text()), path)
        if found:
            logger.info("sampling defaults from the model's %s: %s", FILE, found)
        return cls(**found)

    @classmethod
    def _read(cls, config: dict[str, Any], source: Path) -> dict[str, Any]:
        """The sampling fields `config` sets, in the types of their neutral values."""
        out: dict[str, Any] = {}
        for f in fields(cls):
            value = config.get(f.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise GenerationConfigError(f"{source}: {f.name} must be a number, got {value!r}")
            out[f.name] = type(f.default)(value)
        if out.get("top_k") == 0:
            out["top_k"] = -1
        return out

    def from_model(self) -> dict[str, Any]:
        """The fields that differ from the neutral values (what /get_server_info reports)."""
        neutral = SamplingDefaults()
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != getattr(neutral, f.name)
        }
