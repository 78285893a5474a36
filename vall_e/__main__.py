"""`python -m vall_e TEXT REFERENCES [OUT]` (the reference's synthesis command).

A command path kept stable for users and scripts; the code lives in `vall_e.serving.synthesize`.
"""
import sys

from vall_e.serving.synthesize import main
from vall_e.utils.errors import run_main

if __name__ == "__main__":
    run_main(main, sys.argv[1:])
