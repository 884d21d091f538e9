"""Re-launch the current `mogelm` command under torchrun, and leave no process behind.

`mogelm train --nproc 2 --ep 2` (not yet under torchrun) calls `relaunch(2)`, which runs

    MOGELM_ARGV='["train", "--nproc", "2", "--ep", "2"]' \
        python -m mogelm.parallel.launch --standalone --nproc-per-node 2 -m mogelm

and returns its exit status. Each worker is `python -m mogelm` without arguments, which takes
them from $MOGELM_ARGV (mogelm/__main__.py). The arguments travel in the environment because
torchrun's own parser would otherwise read them (argparse takes `--nproc` for an ambiguous
`--nproc-per-node`). The workers see RANK/WORLD_SIZE/LOCAL_RANK in their environment and
call `mogelm.parallel.context.init_parallel`. torchrun stops every worker when one fails.

`python -m mogelm.parallel.launch ARGS` is torchrun (torch.distributed.run's main) without its
traceback banners: stopped by a signal it exits with 128 + the signal number; when a worker
fails, the worker has printed why (its `error: ...` line or its traceback), and this exits with
the worker's status after one line naming the rank (none for status 2, a UserError).

Process lifetime. torchrun runs in its own process group (a new session), so one signal reaches
it and all its workers. SIGINT, SIGTERM and SIGHUP sent to this process are forwarded to that
whole group, and this process waits for it to end (SIGKILL for what is left after
`STOP_GRACE_S`), then returns 128 + the signal number. On Linux, torchrun is also asked to get
SIGTERM when this process dies (PR_SET_PDEATHSIG), which covers `kill -9` of the parent; the
workers get the same from torchrun (mogelm/__main__.py). Nothing is left running either way
(tests/test_cli_errors.py::test_signal_to_nproc_parent_leaves_no_process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

ARGV_ENV = "MOGELM_ARGV"
STOP_GRACE_S = 20.0  # after a forwarded signal: seconds before what is left gets SIGKILL
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def torchrun_command(nproc: int) -> list[str]:
    return [sys.executable, "-m", "mogelm.parallel.launch", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "mogelm"]


def torchrun_main(args: list[str]) -> int:
    """torch.distributed.run's main on `args`, with its failures as exit statuses (see the module
    docstring) instead of tracebacks."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main(args)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        status = failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode
        if status != 2:  # 2: the worker's own `error: ...` line already says what went wrong
            print(f"error: worker rank {rank} of {e.name} failed with exit status {status} (its output is "
                  "above); every worker was stopped", file=sys.stderr)
        return status
    return 0


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask Linux to send this process SIGTERM when its parent dies (best effort; a no-op elsewhere).
    If the parent is already gone (it died before the request), exit at once."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def relaunch(nproc: int, argv: list[str] | None = None) -> int:
    """Run `mogelm <argv>` (default: this process's arguments) under torchrun with `nproc`
    processes on this machine; returns torchrun's exit status (128 + N after signal N)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    argv = sys.argv[1:] if argv is None else list(argv)
    env = dict(os.environ)
    env[ARGV_ENV] = json.dumps(argv)
    # One thread per process unless the user chose: N processes share the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return run_process_group(torchrun_command(nproc), env)


def run_process_group(cmd: list[str], env: dict) -> int:
    """Run `cmd` as the leader of a new process group; forward SIGINT/SIGTERM/SIGHUP to the whole
    group and wait for it. Returns its exit status, or 128 + the signal number forwarded."""
    parent = os.getpid()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=lambda: die_with_parent(parent))
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        _signal_group(proc, signum)

    old = {}
    try:
        for s in FORWARDED:
            old[s] = signal.signal(s, forward)
    except ValueError:  # not the main thread: signals cannot be caught here; still wait below
        pass
    try:
        while True:
            try:
                status = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            except KeyboardInterrupt:  # a SIGINT that arrived before the handler was installed
                received.append(signal.SIGINT)
                _signal_group(proc, signal.SIGINT)
            if received:
                status = _wait_then_kill(proc)
                break
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if proc.poll() is None:  # an exception of ours: never leave the group running
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    if received or status != 0:  # a worker that outlived a failed or stopped torchrun
        _signal_group(proc, signal.SIGKILL)
    return 128 + received[0] if received else status


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_then_kill(proc: subprocess.Popen) -> int:
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline:
        try:
            return proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
        except KeyboardInterrupt:
            pass
    _signal_group(proc, signal.SIGKILL)
    return proc.wait()


if __name__ == "__main__":
    sys.exit(torchrun_main(sys.argv[1:]))
