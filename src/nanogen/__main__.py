"""``python -m nanogen`` (and ``torchrun -m nanogen``) = the ``nanogen`` command."""

import sys

from nanogen.cli import main

sys.exit(main())
