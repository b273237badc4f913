"""A GGUF file's key/value metadata as plain Python values, and the errors a GGUF file can raise."""

from __future__ import annotations

from typing import Any

import gguf


class GGUFError(ValueError):
    """A GGUF file that cannot be turned into a model folder (malformed or lacking a needed key)."""


class UnsupportedGGUFError(GGUFError):
    """A well-formed GGUF file using something the converter does not handle: `feature` says what
    (architecture, quantization type, tokenizer model, ...) and `value` which one."""

    def __init__(self, feature: str, value: str, supported: tuple[str, ...]) -> None:
        self.feature, self.value, self.supported = feature, value, supported
        super().__init__(f"unsupported GGUF {feature} {value!r}; supported: {', '.join(supported)}")


class GGUFMetadata:
    """The file's metadata keys (`general.architecture`, `llama.block_count`, ...) read once."""

    def __init__(self, reader: gguf.GGUFReader) -> None:
        self.values: dict[str, Any] = {
            name: field.contents()
            for name, field in reader.fields.items()
            if not name.startswith("GGUF.")
        }
        self.arch: str = self.require("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        """`key` as written, or with the `{arch}.` prefix when it starts with a dot (".block_count")."""
        return self.values.get(f"{self.arch}{key}" if key.startswith(".") else key, default)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            name = f"{self.values.get('general.architecture')}{key}" if key.startswith(".") else key
            raise GGUFError(f"GGUF file lacks the metadata key {name!r}")
        return value
