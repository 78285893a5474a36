"""`python -m vall_e.convert SRC [OUT]`: a published VALL-E checkpoint -> one self-contained model.safetensors.

A command path for users and scripts; the code lives in `vall_e.models.vallex_convert`.
"""
from vall_e.models.vallex_convert import main
from vall_e.utils.errors import run_main

if __name__ == "__main__":
    run_main(main)
