"""`python -m crma ...` (what `accelerate launch -m crma ...` and torchrun run): the `crma` CLI."""
import sys

from . import runtime
from .cli import main

if __name__ == "__main__":
    code = main()
    runtime.exit_launched(code)        # several launched processes: no interpreter finalization (see there)
    sys.exit(code)
