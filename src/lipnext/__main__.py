"""``python -m lipnext ...`` (and ``torchrun ... -m lipnext train ...``): the ``lipnext`` command."""
import sys

from .cli import main

sys.exit(main())
