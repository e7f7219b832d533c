"""`python -m meteorit.consumer`: the same as the meteorit-consumer command."""

import sys

from .pipeline import main

sys.exit(main())
