"""``python -m optlab.cli`` (and ``accelerate launch -m optlab.cli``)."""

import sys

from optlab.cli import main

sys.exit(main())
