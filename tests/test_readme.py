"""The README's Python example runs as written."""

import re
from pathlib import Path


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0].replace("/tmp/mogelm-debug", str(tmp_path / "ckpt"))
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "ckpt" / "config.json").is_file()
