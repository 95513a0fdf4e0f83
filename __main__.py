"""`python -m bouncer` is the `bouncer` command."""

import sys

from bouncer.cli.main import main

sys.exit(main())
