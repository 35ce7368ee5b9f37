"""`python -m moefy.cli` == `moefy`."""

import sys

from moefy.cli import main

sys.exit(main())
