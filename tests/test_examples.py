"""The worked examples run (at fewer epochs) and the docs page embeds what they produce."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mkdocs_examples",
                                               ROOT / "scripts" / "mkdocs_examples.py")
hook = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hook)
PAGE = (ROOT / "docs" / "examples.md").read_text()
SCRIPTS = hook.scripts()


def _embedded(name: str) -> set[str]:
    return set(re.findall(rf"\(figures/examples/{name}/([\w.-]+\.png)\)", PAGE))


def test_there_are_examples_and_the_docs_build_runs_them():
    assert len(SCRIPTS) >= 3
    mkdocs = (ROOT / "mkdocs.yml").read_text()
    assert "scripts/mkdocs_examples.py" in mkdocs and "examples.md" in mkdocs


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_example_runs_and_makes_the_embedded_figures(script, tmp_path):
    out = tmp_path / "figures"
    stdout = hook.run_example(script, out, "--epochs", "4", timeout=600)
    made = {p.name for p in out.glob("*.png")}
    assert made and all((out / name).stat().st_size > 10_000 for name in made)
    assert "figures:" in stdout
    embedded = _embedded(script.stem)
    assert embedded and embedded <= made  # the page shows figures the script makes
    for name in embedded:  # ... and the committed copies exist
        assert (hook.FIGURES / script.stem / name).is_file()
    assert (hook.FIGURES / script.stem / "output.txt").is_file()


def test_page_markers_are_spliced_with_source_and_output():
    names = {m.group(2) for m in hook.MARKER.finditer(PAGE)}
    assert names == {s.stem for s in SCRIPTS}
    page = hook.splice(PAGE)
    assert not hook.MARKER.search(page)
    for script in SCRIPTS:
        assert script.read_text().rstrip() in page
    assert "best_test_acc" in page  # a printed summary table
