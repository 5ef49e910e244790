"""One home for the generated sections of ``docs/``: a benchmark's report owns the text between
``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` (its title included) and rewrites only that."""
from __future__ import annotations

import os
from pathlib import Path


def write_section(path: str | os.PathLike, name: str, text: str) -> None:
    """Put ``text`` between the markers of ``name`` in ``path``: in place of the previous section, else appended
    (the file is created if missing); the rest of the file is kept byte for byte."""
    path = Path(path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.strip()}\n{end}\n"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        i, j = old.index(begin), old.index(end) + len(end)
        new = old[:i] + block + old[j:].removeprefix("\n")
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
