"""Re-launch the current `mogelm` command under torchrun.

`mogelm train --nproc 2 --ep 2` (not yet under torchrun) calls `relaunch(2)`, which runs

    MOGELM_ARGV='["train", "--nproc", "2", "--ep", "2"]' \
        python -m torch.distributed.run --standalone --nproc-per-node 2 -m mogelm

and returns its exit status. Each worker is `python -m mogelm` without arguments, which takes
them from $MOGELM_ARGV (mogelm/__main__.py). The arguments travel in the environment because
torchrun's own parser would otherwise read them (argparse takes `--nproc` for an ambiguous
`--nproc-per-node`). The workers see RANK/WORLD_SIZE/LOCAL_RANK in their environment and
call `mogelm.parallel.context.init_parallel`. torchrun stops every worker when one
fails and prints which rank failed first and why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ARGV_ENV = "MOGELM_ARGV"


def torchrun_command(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "mogelm"]


def relaunch(nproc: int, argv: list[str] | None = None) -> int:
    """Run `mogelm <argv>` (default: this process's arguments) under torchrun with `nproc`
    processes on this machine; returns torchrun's exit status."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    argv = sys.argv[1:] if argv is None else list(argv)
    env = dict(os.environ)
    env[ARGV_ENV] = json.dumps(argv)
    # One thread per process unless the user chose: N processes share the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        return subprocess.call(torchrun_command(nproc), env=env)
    except KeyboardInterrupt:
        return 130
