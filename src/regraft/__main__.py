"""``python -m regraft`` runs the command line."""

import sys

from regraft.cli.main import main

sys.exit(main())
