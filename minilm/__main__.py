"""`python -m minilm ...` (and `torchrun -m minilm ...`): the same as the `minilm` command."""

import sys

from minilm.cli import main

sys.exit(main())
