"""`python -m meteorit.consumer`: the same as the meteorit-consumer command."""

import sys

from .command import main

sys.exit(main())
