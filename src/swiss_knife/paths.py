"""Output paths that are safe to write: never over an input, never over what we did not write.

Kept free of torch so that light commands (create-configs, validate) can use it. Work folders
beside an output are named `.NAME.partial-PID-*` (being written) and `.NAME.old-PID-*` (a replaced
output being deleted); the PID tells a live run from a dead one, so later runs clean up after
killed ones without touching anything else.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import OutputExistsError, UserInputError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "swiss_knife.json"


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def refuse_inside_inputs(out: Path, protect: Iterable[str | Path]) -> None:
    """Refuse an output path that is, contains, or lies inside one of the input paths."""
    for item in protect:
        guarded = Path(item).expanduser().resolve()
        if _is_within(out, guarded) or _is_within(guarded, out):
            raise OutputExistsError(
                f"refusing to write {out} over the input {guarded}; choose another output path"
            )


def check_writable_parent(out: Path) -> None:
    """Refuse, before any work, an output path that cannot be created where it is asked for."""
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputExistsError(f"cannot create {out}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserInputError(f"cannot create {out}: no permission to write in {ancestor}")


# Hidden work folders beside an output: `.NAME.partial-PID-*` (being written) and
# `.NAME.old-PID-*` (the replaced output, being deleted). The PID tells a live run from a dead one.
_WORK_KINDS = ("partial", "old")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def work_dir(out: Path, kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))


def clean_stalework_dirs(out: Path) -> list[Path]:
    """Delete the work folders that dead runs left beside `out`; return what was deleted.

    Only folders named by our own pattern, whose process is gone, are touched. A replaced
    output whose swap was cut short (the output itself missing) is put back rather than deleted.
    """
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for kind in _WORK_KINDS:
        for path in sorted(out.parent.glob(f".{out.name}.{kind}-*")):
            pid_text = path.name[len(f".{out.name}.{kind}-") :].split("-", 1)[0]
            if not path.is_dir() or not pid_text.isdigit() or _pid_alive(int(pid_text)):
                continue
            inner = path / "x"
            if kind == "old" and inner.is_dir() and not out.exists():
                os.rename(inner, out)
                logger.warning("restored %s, which an interrupted run had moved aside", out)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def is_own_output(directory: Path) -> bool:
    """Whether a folder is an output this tool wrote (its manifest is there)."""
    return (directory / MANIFEST_NAME).is_file()


def check_output_dir(
    output_dir: str | Path, *, overwrite: bool = False, protect: Iterable[str | Path] = ()
) -> Path:
    """Refuse an output directory that would overwrite data; return it resolved.

    Called before any work so that a long compression never ends in a refused save. With
    `overwrite`, only an empty folder or an output of ours (it holds our manifest) is replaced:
    nothing Swiss Knife did not write is ever deleted.
    """
    out = Path(output_dir).expanduser().resolve()
    refuse_inside_inputs(out, protect)
    check_writable_parent(out)
    clean_stalework_dirs(out)
    if out.exists():
        if not out.is_dir():
            raise OutputExistsError(f"output path {out} exists and is a file")
        if any(out.iterdir()):
            if not overwrite:
                raise OutputExistsError(
                    f"output directory {out} is not empty; pass --overwrite to replace it"
                )
            if not is_own_output(out):
                raise OutputExistsError(
                    f"output directory {out} holds files Swiss Knife did not write (no "
                    f"{MANIFEST_NAME}); --overwrite replaces only an earlier output or an empty "
                    "folder, so choose another directory"
                )
        if not os.access(out, os.W_OK | os.X_OK):
            raise UserInputError(f"cannot write in {out}: permission denied")
    return out


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a))


def replace_dir(new: Path, out: Path) -> None:
    """Put the finished folder `new` at `out`, replacing what is there without a gap.

    Where the kernel can swap two folders atomically, it does; elsewhere the old output is moved
    into an `.old-PID-*` folder first, and a run cut short between the two renames is repaired by
    the next run's `clean_stalework_dirs` (the old output is put back).
    """
    if not out.exists():
        os.rename(new, out)
        return
    if _exchange(new, out):
        shutil.rmtree(new, ignore_errors=True)  # now holds the old output
        return
    old = work_dir(out, "old")
    os.rename(out, old / "x")
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)
