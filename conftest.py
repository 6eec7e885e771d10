"""Loaded by pytest before any test module, so before torch.

The test processes run engines on a CPU shared with other jobs, so they take the OpenMP wait policy
the `adapterzoo` command sets (adapterzoo/cli.py `main`): spinning at barriers beside a busy
neighbour makes a decode step up to 15x slower. `import adapterzoo` itself sets nothing.
"""

import os
import sys

if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
