"""The one way dsclip replaces a file: atomically (readers see the old file or the new one, never
half of either) and durably (on disk before the new name is visible)."""
import errno
import os
from pathlib import Path
from typing import Callable


def atomic_write(target: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` fills a temporary file beside `target`; it is synced, then renamed over
    `target`, then the folder is synced so the rename survives a power cut."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        sync_file(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    sync_folder(target.parent)


def atomic_write_text(target: Path, text: str) -> None:
    atomic_write(target, lambda path: Path(path).write_text(text))


def sync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that names created or renamed in it are on disk. Some network and FUSE
    filesystems refuse to sync a folder (EINVAL); there the rename is as durable as they make it."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then the folders themselves: a folder about to be renamed
    into place is on disk first."""
    for path in sorted(Path(folder).rglob("*"), reverse=True):
        if path.is_file():
            sync_file(path)
        else:
            sync_folder(path)
    sync_folder(Path(folder))
