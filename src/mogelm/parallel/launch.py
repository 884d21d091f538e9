"""Re-launch the current `mogelm` command under torchrun.

`mogelm train --nproc 2 --ep 2` (not yet under torchrun) calls `relaunch(2)`, which runs

    MOGELM_ARGV='["train", "--nproc", "2", "--ep", "2"]' \
        python -m torch.distributed.run --standalone --nproc-per-node 2 -m mogelm.parallel.launch

and returns its exit status. The arguments travel in the environment because torchrun's own
parser would otherwise read them (argparse takes `--nproc` for an ambiguous `--nproc-per-node`). The children see RANK/WORLD_SIZE in their environment
(`under_torchrun()` is then True) and call `mogelm.parallel.context.init_parallel`. torchrun
stops every worker when one fails and prints which rank failed first and why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ARGV_ENV = "MOGELM_ARGV"


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "mogelm.parallel.launch"]


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


def _worker_main() -> int:
    """Entry point of each torchrun worker: `mogelm <argv from the environment>`."""
    from mogelm.cli import main

    return main(json.loads(os.environ[ARGV_ENV]))


if __name__ == "__main__":
    sys.exit(_worker_main())
