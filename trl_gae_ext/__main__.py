"""`python -m trl_gae_ext ...` is `trl-gae ...` (e.g. `python -m trl_gae_ext demo --smoke`), for environments whose
console scripts are not on PATH."""

import sys

from .cli import main


if __name__ == "__main__":
    sys.exit(main())
