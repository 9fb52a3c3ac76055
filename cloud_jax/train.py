"""``python -m cloud_jax.train --config configs/X.yaml [key=value ...]``: the training command.

Kept at this path because pods, scripts and docs launch it by this name; the command lives in
:mod:`cloud_jax.cli.train`.
"""

import sys

from cloud_jax.cli.common import run_command
from cloud_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
