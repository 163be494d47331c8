"""`python -m crma ...` (what `accelerate launch -m crma ...` and torchrun run): the `crma` CLI."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
