"""`python -m vall_e.webui`: the Gradio web UI.

A command path kept stable for users and scripts; the code lives in `vall_e.serving.webui`.
"""
import sys

from vall_e.serving.webui import main
from vall_e.utils.errors import run_main

if __name__ == "__main__":
    run_main(main, sys.argv[1:])
