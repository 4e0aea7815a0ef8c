"""Print the rule table, or write it between the markers of the given Markdown files.

Usage: ``python -m sam_diagnostics.rules [--write README.md docs/concepts.md]``
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import layer_table

BEGIN, END = "<!-- rules-table:begin -->", "<!-- rules-table:end -->"


def fill(text: str) -> str:
    """``text`` with the table between the markers replaced by :func:`layer_table`."""
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{layer_table()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--write"]:
        for name in argv[1:]:
            path = Path(name)
            path.write_text(fill(path.read_text()))
        return 0
    print(layer_table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
