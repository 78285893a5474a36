"""`python -m vall_e.export yaml=...`: write model.safetensors from the latest checkpoint.

A command path kept stable for users and scripts; the code lives in `vall_e.training.export`.
"""
from vall_e.training.export import main
from vall_e.utils.errors import run_main

if __name__ == "__main__":
    run_main(main)
