"""The Python API example of the manual (docs/layout.md, linked from README.md) runs as printed."""

import re

import pytest

from cli_helpers import REPO, run_python

pytestmark = pytest.mark.slow  # end-to-end runs of the programs


def test_the_python_api_example_runs(tmp_path):
    page = (REPO / "docs" / "layout.md").read_text(encoding="utf-8")
    section = page[page.index("## Python API"):]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(example, encoding="utf-8")
    # Run where its relative data paths point: the glyphs are rendered into tmp_path/data.
    result = run_python(str(script), cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"'recall@1': [0-9.]+", result.stdout) and "map@r" in result.stdout
    assert (tmp_path / "data" / "glyphs_cache").is_dir()
