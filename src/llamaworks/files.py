"""Files we write and files we read, done one way everywhere.

Writing: every file goes to a temp sibling and is renamed into place (`atomic_write`, `atomic_write_with`);
every model folder is built beside its target and swapped in whole (`replace_dir`). Temps are named
`.{name}.{pid}-{random}.tmp`, so the next write of the same name removes the ones a killed process left
behind, and they get the mode a plain open() would give (0666/0777 minus the umask), not mkstemp's 0600.

Reading: `read_json` turns anything a damaged or hostile JSON file can provoke (bad UTF-8, deep nesting,
huge numbers, a huge file) into one `FormatError` line; `contained_path` refuses a path read from a file
that reaches outside the file's folder.

shutil and tempfile are imported inside the functions that write: the native runtime's process imports this
module to read, and every module it imports stays resident.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, Any

from .errors import FormatError


def _umask() -> int:
    umask = os.umask(0)  # the only portable way to read the umask is to set it and put it back
    os.umask(umask)
    return umask


_UMASK = _umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK
MAX_JSON_BYTES = 256 << 20  # config.json is ~1 KB, tokenizer.json tens of MB, a shard index ~100 KB


# -- temp names ---------------------------------------------------------------------------------------
def _temp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    import shutil
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale_temps(directory: Path, name: str) -> list[Path]:
    """Remove `.{name}.{pid}-*.tmp|.old|.trash` leftovers of processes that no longer run; returns what was
    removed."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(\d+)-[^./]+\.(tmp|old|trash)$")
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _remove(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


# -- files --------------------------------------------------------------------------------------------
def _new_temp_file(path: Path) -> tuple[int, str]:
    import tempfile
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent, path.name)
    return tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[tuple[int, str]]:
    """(fd, name) of a temp file next to `path`; it replaces `path` only if the block finishes without error."""
    fd, tmp = _new_temp_file(path)
    try:
        yield fd, tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temp file next to `path`; it replaces `path` only if the block finishes without error."""
    with _staged(Path(path)) as (fd, _), os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
        yield f


def atomic_write_with(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> None:
    """Call write(tmp_path) for libraries that open the file themselves, then move it into place."""
    with _staged(Path(path)) as (fd, tmp):
        os.close(fd)
        write(Path(tmp))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


# -- folders ------------------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _link_tree(src: Path, dst: Path) -> None:
    """Recreate `src` at `dst` with hard links (no data copied); copies where links are not allowed."""
    import shutil
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        shutil.copystat(src, dst)
        for entry in os.scandir(src):
            _link_tree(Path(entry.path), dst / entry.name)
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def recover_dir(target: Path) -> None:
    """Undo what a process killed in the middle of `replace_dir`'s fallback swap left: put `.old` back."""
    target = Path(target)
    if target.exists() or target.is_symlink():
        return
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)-[^./]+\.old$")
    olds = [Path(e.path) for e in os.scandir(target.parent) if pattern.match(e.name) and e.is_dir()] \
        if target.parent.is_dir() else []
    if olds:
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        os.rename(newest, target)


@contextlib.contextmanager
def replace_dir(target: str | os.PathLike[str], *, drop: Callable[[str], bool] = lambda name: True) -> Iterator[Path]:
    """Yield an empty folder beside `target`; when the block succeeds it becomes `target` in one swap.

    Entries of the old `target` that the new folder does not have are carried over (hard links) unless
    `drop(name)` says they are stale outputs of the writer (the default: carry nothing over). A process
    killed at any moment leaves either the old folder or the new one at `target`, never a mix; its
    temp folder is removed by the next write of the same target.
    """
    import shutil
    import tempfile
    target = Path(os.path.abspath(target))  # "." and "out/" have a real name and parent
    if target.is_symlink() and target.is_dir():
        target = target.resolve()  # swap the folder the link points to, keep the user's link
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    clean_stale_temps(parent, target.name)
    if (target.exists() or target.is_symlink()) and not target.is_dir():
        raise FormatError(f"{target}: exists and is not a directory")
    stage = Path(tempfile.mkdtemp(prefix=_temp_prefix(target.name), suffix=".tmp", dir=parent))
    try:
        os.chmod(stage, DIR_MODE)
        yield stage
        written = set(os.listdir(stage))
        for entry in os.scandir(target) if target.exists() else ():
            if entry.name not in written and not drop(entry.name):
                _link_tree(Path(entry.path), stage / entry.name)
        stage = swap_in(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def swap_in(new: Path, target: Path) -> Path:
    """Put folder `new` at `target` in one step; returns where the old `target` now is (to be deleted). Where
    the system cannot swap atomically, `target` is missing for an instant, and recover_dir() undoes a kill there."""
    import tempfile
    if not target.exists():
        os.rename(new, target)
        return new
    if _exchange(new, target):
        return new
    old = Path(tempfile.mkdtemp(prefix=_temp_prefix(target.name), suffix=".old", dir=target.parent))
    os.rename(target, old)  # replaces the empty folder; a kill before the next line: recover_dir
    os.rename(new, target)
    return old


def remove_dir(path: Path) -> None:
    """Delete a folder so that a kill midway never leaves a half-deleted one under its name: rename it to
    `.{name}.{pid}-{random}.trash` first (removed by the next clean_stale_temps of that name if we die)."""
    import shutil
    import tempfile
    path = Path(path)
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name), suffix=".trash", dir=path.parent))
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# -- reading ------------------------------------------------------------------------------------------
def read_json(path: str | os.PathLike[str], max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file; anything wrong with it is one FormatError line naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise FormatError(f"{path}: JSON file of {size:,} bytes is larger than the {max_bytes:,} allowed")
        return json.loads(path.read_bytes().decode("utf-8"))
    except FormatError:
        raise
    except FileNotFoundError:
        raise FormatError(f"{path}: file is missing") from None
    except RecursionError:
        raise FormatError(f"{path}: not valid JSON (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError, MemoryError) as e:
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        raise FormatError(f"{path}: not valid JSON ({msg[:200]})") from None


def containment_root(folder: Path) -> Path:
    """The folder a checkpoint's own paths may reach: the folder itself, or for a Hugging Face hub cache
    snapshot (`models--org--name/snapshots/REV/`, whose files link to `../../blobs/`) the cached repo."""
    root = folder.resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith(("models--", "datasets--")):
        return root.parent.parent
    return root


def contained_path(folder: Path, relative: Any, source: Path | str, field: str) -> Path:
    """`folder / relative` for a path read from a file, refused (one line naming the file and field) when
    it is absolute, climbs with `..`, or resolves (through symlinks) outside the folder."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise FormatError(f"{source}: {field} must be a file name inside {folder}, not {relative!r}")
    if (PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).is_absolute()
            or PureWindowsPath(relative).drive or ".." in PurePosixPath(relative.replace("\\", "/")).parts):
        raise FormatError(f"{source}: {field} {relative!r} points outside {folder}; refusing to open it")
    candidate = folder / relative
    resolved = candidate.resolve()
    if not resolved.is_relative_to(containment_root(folder)):
        raise FormatError(f"{source}: {field} {relative!r} resolves to {resolved}, outside {folder}; "
                          f"refusing to open it")
    return candidate


__all__ = ["DIR_MODE", "FILE_MODE", "atomic_write", "atomic_write_text", "atomic_write_with", "clean_stale_temps",
           "contained_path", "read_json", "recover_dir", "remove_dir", "replace_dir", "swap_in"]
