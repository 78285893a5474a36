"""`python -m vall_e.train yaml=...` (also under `torchrun`, or `deepspeed --module vall_e.train`).

A command path kept stable for users and scripts; the code lives in `vall_e.training.trainer`.
"""
from vall_e.training.trainer import main
from vall_e.utils.errors import run_main

if __name__ == "__main__":
    run_main(main)
