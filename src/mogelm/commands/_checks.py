"""Flag checks the commands share, each a UserError naming the flag (not a command: cli.COMMANDS
does not list this module).

    check_device(args.device)                  # None / auto / cpu / cuda[:N]; CUDA must be there
    check_range(args, "threads", low=1)        # --threads >= 1 when given
"""

from __future__ import annotations

import argparse

from mogelm.errors import UserError


def check_device(name: str | None, flag: str = "--device") -> str | None:
    """The device name unchanged when this machine has it (None and "auto" pass as they are);
    else UserError: an unknown name, or CUDA asked for where there is none."""
    if name is None or name == "auto":
        return name
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"{flag} {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cpu":
        return name
    if dev.type != "cuda":
        raise UserError(f"{flag} {name}: mogelm runs on cpu or cuda, not {dev.type}")
    if not torch.cuda.is_available():
        raise UserError(f"{flag} {name}: CUDA is not available on this machine; use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"{flag} {name}: this machine has {torch.cuda.device_count()} GPU(s) "
                        f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return name


def check_range(args: argparse.Namespace, *names: str, low: float, allow_none: bool = True,
                note: str = "") -> None:
    """UserError unless each named option is >= low (None passes when allow_none)."""
    for name in names:
        v = getattr(args, name)
        if v is None and allow_none:
            continue
        if v is None or v < low:
            rule = "positive" if low == 1 else f"at least {low:g}"
            raise UserError(f"--{name.replace('_', '-')} must be {rule}{note}, got {v}")
