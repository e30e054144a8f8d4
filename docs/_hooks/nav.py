"""MkDocs hook: build the "Methods", "Notebooks" and "Guides" sections of the nav from the files that exist.

Every ``docs/methods/*.md`` becomes a page under "Methods" (stable first, then experimental, each
alphabetical), so a new method's page appears without editing mkdocs.yml. Every
``examples/notebooks/*.ipynb`` is added to the site as ``notebooks/<name>.ipynb`` (rendered by
mkdocs-jupyter, not executed) and listed under "Notebooks". Any other ``docs/*.md`` that mkdocs.yml
does not list goes under "Guides".
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "examples" / "notebooks"
STABLE = ROOT / "lit_posttrain" / "stable"
PIPELINE = ["sft", "dpo", "kto", "reward", "grpo", "rloo"]


def _title(path: Path) -> str:
    """The page's first '# ' heading, else its file name."""
    for line in path.read_text().splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem


def on_config(config):
    methods = sorted(Path(config["docs_dir"], "methods").glob("*.md"))
    # stable: in pipeline order, then any other stable method alphabetically
    stable = sorted((p for p in methods if (STABLE / f"{p.stem}.py").exists()),
                    key=lambda p: (PIPELINE.index(p.stem) if p.stem in PIPELINE else len(PIPELINE), p.stem))
    experimental = [p for p in methods if p not in stable]
    notebooks = sorted(NOTEBOOKS.glob("*.ipynb"))
    nav = []
    for entry in config["nav"]:
        if entry == {"Methods": "AUTO"}:
            entry = {"Methods": [{"Stable": [{_title(p).split(":")[0]: f"methods/{p.name}"} for p in stable]},
                                 {"Experimental": [{_title(p).split(":")[0]: f"methods/{p.name}"} for p in experimental]}]}
        elif entry == {"Notebooks": "AUTO"}:
            entry = {"Notebooks": ["notebooks.md"] + [f"notebooks/{p.name}" for p in notebooks]}
        nav.append(entry)
    # any other top-level page (e.g. docs/qlora.md) is listed too, before the FAQ, so none is unreachable
    listed = {value for entry in nav for value in entry.values() if isinstance(value, str)}
    guides = [{_title(p).split(":")[0]: p.name} for p in sorted(Path(config["docs_dir"]).glob("*.md"))
              if p.name not in listed and p.name != "notebooks.md"]
    if guides:
        at = next(i for i, entry in enumerate(nav) if "FAQ and troubleshooting" in entry)
        nav[at:at] = [{"Guides": guides}]
    config["nav"] = nav
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns .ipynb files into pages
def on_files(files, config):
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        files.append(File(f"notebooks/{path.name}", str(NOTEBOOKS.parent), config["site_dir"], config["use_directory_urls"]))
    return files
