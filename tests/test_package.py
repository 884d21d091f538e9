"""`import mogelm` stays light (no triton, matplotlib or web stack until a feature needs them), and
the `mogelm` command reaches every subcommand in cli.COMMANDS."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mogelm import cli
from mogelm.cli import COMMANDS


def test_import_mogelm_needs_no_optional_dependencies():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('triton', 'matplotlib', 'fastapi', 'uvicorn'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import mogelm, torch\n"
        "from mogelm.kernels import ops\n"
        "cfg = mogelm.from_name('debug')\n"
        "y = mogelm.Transformer(cfg)(torch.zeros(1, 4, dtype=torch.long))\n"
        "assert not ops.triton_available()\n"
        "print('ok', tuple(y.shape))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok (1, 4, 512)"


def test_cli_help_lists_every_command():
    env = {**os.environ, "COLUMNS": "1000"}  # no wrapping inside a help text
    r = subprocess.run([sys.executable, "-m", "mogelm", "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    listing = " ".join(r.stdout.split("positional arguments:")[1].split("options:")[0].split())
    assert listing == "COMMAND " + " ".join(f"{name} {text}" for name, (_, text) in COMMANDS.items())


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_builds_its_parser_and_help_exits_0(name, capsys):
    # imports the command's module and runs its add_arguments: a wrong module path or a broken
    # parser fails here, not in front of a user
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mogelm {name}")


def test_unknown_or_missing_command(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        cli.main(["no-such-command"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert cli.main([]) == 0 and capsys.readouterr().out.startswith("usage: mogelm")
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("mogelm.commands.ghost", "a command whose module is gone"))
    assert cli.main(["ghost"]) == 2
    assert capsys.readouterr().err == ("error: `mogelm ghost` is not available in this build "
                                       "(mogelm.commands.ghost is missing)\n")


def test_library_code_never_imports_the_commands():
    """Dependencies point one way: the commands import the library, never the reverse."""
    root = Path(cli.__file__).parent
    offenders = [str(f.relative_to(root)) for f in root.rglob("*.py")
                 if f.parent.name != "commands" and f.name not in ("cli.py", "__main__.py")
                 and re.search(r"^\s*(from|import)\s+mogelm\.commands\b", f.read_text(), flags=re.M)]
    assert offenders == []
