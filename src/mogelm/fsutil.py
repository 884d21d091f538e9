"""File-system helpers: atomic updates (a reader sees the old version or the new one, never a mix),
usual permissions, and checks of an output path made before any work starts."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mogelm.errors import UserError


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished folder `tmp` to `path`, replacing what was there.

    The old folder is first renamed aside, then the new one renamed in, then the old one removed:
    after a crash at any point either `path` or `.<name>.old` beside it holds a complete copy."""
    old = path.parent / f".{path.name}.old"
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def usual_permissions(path: Path) -> None:
    """Give a file the mode a plain open() would (0644 under umask 022): some writers (safetensors)
    create private 0600 files."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, briefly, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """UserError unless `path` is a folder or can become one: not a file, not under a file, and
    its nearest existing parent writable. Call before expensive work, so a bad path fails at once."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; choose another {flag}")
    parent = path
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, so no folder can be made under it; "
                        f"choose another {flag}")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {parent} is not writable; choose another {flag}")
    return path


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """UserError unless a file can be written at `path`: not a folder, its folder exists and is
    writable. Call before the work whose result goes there."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"{flag} {path}: the folder {folder} does not exist; create it or choose another "
                        "path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: the folder {folder} is not writable")
    return path
