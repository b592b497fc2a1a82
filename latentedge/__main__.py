from __future__ import annotations

import sys

from latentedge.cli import main

sys.exit(main())
