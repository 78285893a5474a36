"""The one helper every configuration dataclass uses: a field with a default and a help text."""
from __future__ import annotations

import json
from dataclasses import field
from typing import Any


def setting(default: Any, help: str) -> Any:
    """A dataclass field with a help text (`python -m vall_e.config help=true` prints it); mutable
    defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"help": help})
    return field(default=default, metadata={"help": help})
