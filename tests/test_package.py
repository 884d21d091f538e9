"""`import mogelm` stays light: no triton, matplotlib or web stack until a feature needs them."""

import subprocess
import sys


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
    r = subprocess.run([sys.executable, "-m", "mogelm", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("train", "compare", "eval", "generate", "serve", "bench", "sim", "imbalance", "info"):
        assert cmd in r.stdout
