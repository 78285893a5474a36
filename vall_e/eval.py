"""`python -m vall_e.eval`: objective evaluation of synthesized speech.

A command path kept stable for users and scripts; the code lives in `vall_e.evaluation.evaluate`.
"""
import sys

from vall_e.evaluation.evaluate import main
from vall_e.utils.errors import run_main

if __name__ == "__main__":
    run_main(main, sys.argv[1:])
