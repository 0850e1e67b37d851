"""``python -m sanet`` (also what ``torchrun -m sanet train`` runs)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
