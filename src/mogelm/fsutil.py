"""Atomic file-system updates: a reader sees the old version or the new one, never a mix."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


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
