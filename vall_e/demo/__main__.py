"""`python -m vall_e.demo` (also `vall-e demo`): the code lives in `vall_e.demo.run`."""
import sys

from vall_e.demo.run import main
from vall_e.utils.errors import run_main

if __name__ == "__main__":
    run_main(main, sys.argv[1:])
