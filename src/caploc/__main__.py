"""``python -m caploc ...`` (also what ``torchrun -m caploc`` runs)."""
from .cli import main

raise SystemExit(main())
