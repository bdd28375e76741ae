"""Commented sample configs that `swiss-knife create-configs` writes out.

The YAML files beside this module are the samples themselves; a test loads and validates each.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import OutputExistsError
from ..paths import check_writable_parent


def sample_names() -> list[str]:
    return sorted(p.name for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def sample_text(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def write_samples(output_dir: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Copy every sample into `output_dir`; existing files are kept unless `overwrite`."""
    out = Path(output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} is a file; give a folder for the sample configs")
    check_writable_parent(out.resolve())
    names = sample_names()
    clashes = [n for n in names if (out / n).exists()]
    if clashes and not overwrite:
        raise OutputExistsError(
            f"{out} already has {', '.join(clashes)}; pass --overwrite to replace them"
        )
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        (out / name).write_text(sample_text(name), encoding="utf-8")
        written.append(out / name)
    return written
