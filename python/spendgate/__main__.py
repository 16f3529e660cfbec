"""`python -m spendgate` is the `spendgate` command."""

import sys

from spendgate.cli import main

sys.exit(main())
