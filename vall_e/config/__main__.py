"""`python -m vall_e.config [yaml=PATH] [key=value ...] [help=true]`: print the resolved configuration."""
from __future__ import annotations

import argparse
import json
from typing import Sequence

from vall_e.config.loading import parse_config
from vall_e.utils.errors import run_main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vall_e.config",
                                     description="Print the resolved configuration as JSON.")
    cfg, _ = parse_config(argv, parser)
    print(json.dumps(cfg.to_dict(), indent=2, default=str))  # YAML dates etc. in free-form dicts
    return 0


if __name__ == "__main__":
    run_main(main)
