"""`python -m vall_e.server`: the OpenAI-compatible HTTP API server.

A command path kept stable for users and scripts; the code lives in `vall_e.serving.server`.
"""
import sys

from vall_e.serving.server import main
from vall_e.utils.errors import run_main

if __name__ == "__main__":
    run_main(main, sys.argv[1:])
