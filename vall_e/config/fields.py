"""Helpers every configuration dataclass uses: a field with a default and a help text, and the strict
round trip through a plain dict that stored model configs take."""
from __future__ import annotations

import json
from dataclasses import asdict, field, fields
from typing import Any, TypeVar

from vall_e.utils.errors import UserError

T = TypeVar("T", bound="StoredConfig")


def setting(default: Any, help: str) -> Any:
    """A dataclass field with a help text (`python -m vall_e.config help=true` prints it); mutable
    defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"help": help})
    return field(default=default, metadata={"help": help})


class StoredConfig:
    """`to_dict` / `from_dict` for a config dataclass stored in model files: keys added since a file was
    written take their defaults, keys this version does not know are a one-line error."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        unknown = set(d) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise UserError(f"model config: unknown key(s) {', '.join(sorted(unknown))}")
        return cls(**d)
