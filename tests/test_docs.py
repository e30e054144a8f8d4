"""The documentation site builds without a warning, and it covers every method and every quickstart."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD_DIRS = [ROOT / "lit_posttrain" / "stable", ROOT / "lit_posttrain" / "experimental"]
METHODS = sorted(p.stem for d in METHOD_DIRS for p in d.glob("*.py") if not p.stem.startswith("_"))
PAGES = ROOT / "docs" / "methods"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """`mkdocs build --strict` of the repository's mkdocs.yml into a temporary directory."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return out


def test_strict_build_has_every_page_and_notebook(site):
    """With --strict (a warning fails), every docs/methods page and every notebook is built and linked
    from the navigation, which the hook fills from the files that exist."""
    home = (site / "index.html").read_text()
    for page in sorted(PAGES.glob("*.md")):
        assert (site / "methods" / page.stem / "index.html").is_file(), page.name
        assert f'href="methods/{page.stem}/"' in home, f"{page.name} is not in the navigation"
    for notebook in sorted((ROOT / "examples" / "notebooks").glob("*.ipynb")):
        assert (site / "notebooks" / notebook.stem / "index.html").is_file(), notebook.name
        assert f'href="notebooks/{notebook.stem}/"' in home, f"{notebook.name} is not in the navigation"
    # the API reference is rendered from the docstrings (mkdocstrings), not left as a ':::' directive
    dpo = (site / "methods" / "dpo" / "index.html").read_text()
    assert "DPOModule" in dpo and ":::" not in dpo and "label_smoothing" in dpo


def test_every_method_has_a_page():
    """Each module in lit_posttrain/stable and lit_posttrain/experimental has docs/methods/<module>.md."""
    missing = [name for name in METHODS if not (PAGES / f"{name}.md").is_file()]
    assert not missing, f"no docs/methods/<name>.md for: {', '.join(missing)}"


def test_every_quickstart_is_referenced_from_a_method_page():
    """Each configs/quickstart/*.yaml is named on some docs/methods page (with its expected figures)."""
    text = "\n".join(page.read_text() for page in PAGES.glob("*.md"))
    quickstarts = sorted((ROOT / "configs" / "quickstart").glob("*.yaml"))
    missing = [p.name for p in quickstarts if f"configs/quickstart/{p.name}" not in text]
    assert quickstarts and not missing, f"quickstarts named on no docs/methods page: {', '.join(missing)}"
