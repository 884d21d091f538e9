"""`python -m mogelm ARGS`: the `mogelm` command (mogelm.cli).

Without ARGS and with $MOGELM_ARGV set, the arguments are that JSON list: how the torchrun
workers started by mogelm.parallel.launch.relaunch get theirs; such a worker also asks for SIGTERM
when its parent (torchrun) dies, so a killed launcher leaves no worker behind.
"""

import json
import os
import sys

from mogelm.cli import main
from mogelm.parallel.launch import ARGV_ENV, die_with_parent

argv = sys.argv[1:]
if not argv and ARGV_ENV in os.environ:
    argv = json.loads(os.environ.pop(ARGV_ENV))  # popped: processes this one starts get their own
    die_with_parent(os.getppid())
sys.exit(main(argv))
