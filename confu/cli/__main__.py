"""`python -m confu.cli ...` (e.g. under `torchrun --nproc_per_node N -m confu.cli train ...`)."""

import sys

from confu.cli import main

sys.exit(main())
