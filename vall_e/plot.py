"""`python -m vall_e.plot yaml=...`: plot the training metrics.

A command path kept stable for users and scripts; the code lives in `vall_e.training.plot`.
"""
from vall_e.training.plot import main
from vall_e.utils.errors import run_main

if __name__ == "__main__":
    run_main(main)
