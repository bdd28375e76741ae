"""Write one script's section of benchmarks/RESULTS.md between its own markers."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
RESULTS_HEADER = (
    "# Benchmarks\n\n"
    "Measured results of the scripts in `benchmarks/`. Each section is written by its script "
    "between its own markers and replaced when the script is run again.\n"
)


def write_section(name: str, section: str, path: Path = RESULTS) -> None:
    """Replace (or append) the `name` section, leaving every other section alone."""
    start_mark, end_mark = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else RESULTS_HEADER
    block = f"{start_mark}\n{section.rstrip()}\n{end_mark}"
    start, end = text.find(start_mark), text.find(end_mark)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(end_mark) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
