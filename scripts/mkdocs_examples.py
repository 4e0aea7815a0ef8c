"""Execute the worked examples for the docs, and splice their source and output into the page.

Used two ways:

- as an MkDocs hook (``hooks:`` in mkdocs.yml): ``mkdocs build`` runs every script in
  ``examples/`` once (``on_pre_build``), writing its figures and its printed output to
  ``docs/figures/examples/<name>/``, then replaces the markers
  ``<!-- example-source: NAME -->`` and ``<!-- example-output: NAME -->`` in the pages by the
  script's source and output (``on_page_markdown``). ``SD_DOCS_SKIP_EXAMPLES=1`` skips the
  execution and uses the committed outputs (for a quick ``mkdocs serve``);
- as a script: ``python scripts/mkdocs_examples.py`` regenerates the committed figures and
  outputs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FIGURES = ROOT / "docs" / "figures" / "examples"
MARKER = re.compile(r"<!-- example-(source|output): ([\w-]+) -->")


def scripts() -> list[Path]:
    return sorted(EXAMPLES.glob("[0-9][0-9]_*.py"))


def run_example(script: Path, out_dir: Path, *extra: str, timeout: float = 900) -> str:
    """Run one example (``--out out_dir``) in a fresh interpreter; return its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        "MPLBACKEND": "Agg"}
    # run outside the repository: opacus installs top-level ``examples``/``benchmarks``
    # packages, and the examples must not depend on the working directory
    proc = subprocess.run([sys.executable, str(script), "--out", str(out_dir), *extra],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=out_dir.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def generate() -> None:
    for script in scripts():
        out = FIGURES / script.stem
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*"):
            old.unlink()
        stdout = run_example(script, out)
        # figure paths in the output are machine-specific: keep the file names only
        stdout = re.sub(r"figures: .*", lambda m: "figures: " + ", ".join(
            Path(p.strip()).name for p in m.group(0)[len("figures: "):].split(",")), stdout)
        (out / "output.txt").write_text(stdout)
        for pdf in out.glob("*.pdf"):  # the docs embed the PNGs
            pdf.unlink()


def splice(markdown: str) -> str:
    """Replace the example markers by the script's source / recorded output."""

    def replace(match: re.Match) -> str:
        kind, name = match.groups()
        if kind == "source":
            text = (EXAMPLES / f"{name}.py").read_text().rstrip()
            return f"```python\n{text}\n```"
        text = (FIGURES / name / "output.txt").read_text().rstrip()
        return f"```text\n{text}\n```"

    return MARKER.sub(replace, markdown)


# ---------------------------------------------------------------- MkDocs hook events
def on_pre_build(config, **kwargs) -> None:
    if os.environ.get("SD_DOCS_SKIP_EXAMPLES") != "1":
        generate()


def on_page_markdown(markdown: str, **kwargs) -> str:
    return splice(markdown)


if __name__ == "__main__":
    generate()
    print("wrote", ", ".join(str(p.relative_to(ROOT)) for p in sorted(FIGURES.rglob("*.*"))))
