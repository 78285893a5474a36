"""`python -m vall_e.config [yaml=PATH] [key=value ...] [help=true]`: print the resolved configuration.

`python -m vall_e.config migrate OLD.yaml > NEW.yaml`: write a config of the reference implementation
(mrq/vall-e) in our layout, headed by comments that say what became of each key (`vall_e.config.migrate`).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from vall_e.config.loading import migrate_file, parse_config
from vall_e.utils.errors import run_main


def migrate_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vall_e.config migrate",
        description="Write a config file of the reference implementation (mrq/vall-e) in our layout to stdout, "
                    "headed by comments that list what became of each key. Nothing in it is evaluated. Exit "
                    "status 1 when some key needs a decision (marked in the output).")
    parser.add_argument("old", help="the reference's config YAML")
    args = parser.parse_args(list(argv))
    m = migrate_file(args.old)
    sys.stdout.write(m.to_yaml(args.old))
    print(f"{args.old}: {m.summary()} (listed at the top of the output)", file=sys.stderr)
    return 1 if m.decide else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["migrate"]:
        return migrate_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m vall_e.config",
                                     description="Print the resolved configuration as JSON. "
                                                 "`python -m vall_e.config migrate OLD.yaml > NEW.yaml` converts "
                                                 "a config of the reference implementation (mrq/vall-e).")
    cfg, _ = parse_config(argv, parser)
    print(json.dumps(cfg.to_dict(), indent=2, default=str))  # YAML dates etc. in free-form dicts
    return 0


if __name__ == "__main__":
    run_main(main)
