"""`atomic_path`: replace a file whole, or not at all."""

import contextlib
import os
import secrets

# Stray temporaries (from a killed process) start with this, so that they are
# easy to spot and to delete by hand; nothing here ever deletes other files.
TEMPORARY_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(filepath):
    """Yields a temporary path to write, then puts it in place of `filepath`.

    Writing a file in place leaves it truncated when the process dies
    mid-write, and the last good version is lost with it. Instead, the block
    writes the temporary path, in the same folder as `filepath` so that the
    final `os.replace` is a rename within one file system: atomic on POSIX,
    a single replacing move on Windows. When the block succeeds, the temporary is flushed to disk,
    renamed over `filepath`, and the rename itself is flushed; at any moment,
    `filepath` is the previous file or the new one, whole. When the block
    raises (also `KeyboardInterrupt`), the temporary is removed and
    `filepath` is untouched. A process killed meanwhile can leave a
    temporary, `.tmp-<hex>.<name of filepath>`, next to `filepath`.

    The temporary's name ends with the whole name of `filepath`, so it keeps
    any suffix a writer requires (`.keras`, `.weights.h5`, `.h5`). A remote
    path (`gs://...`, anything with `://`) is yielded as it is: object stores
    publish an object whole at the end of its upload, and cannot rename. A
    symbolic link is followed: its target is replaced, as writing in place
    would.

    Args:
        filepath: `str` or `os.PathLike`, the file to replace or create. Its
            folder must exist.

    Example:

    ```python
    with atomic_path("model.keras") as path:
        model.save(path)
    ```
    """
    filepath = os.fspath(filepath)
    if "://" in filepath:
        yield filepath
        return
    if os.path.islink(filepath):
        # Writing in place goes through a link; so does this, rather than
        # replacing the link by a file and leaving its target stale.
        filepath = os.path.realpath(filepath)
    folder, name = os.path.split(filepath)
    # A fresh name, not `tempfile.mkstemp`: that creates the file with mode
    # 0600, which the rename would give the checkpoint.
    temporary = os.path.join(
        folder, f"{TEMPORARY_PREFIX}{secrets.token_hex(4)}.{name}"
    )
    try:
        yield temporary
        # Without this, a crash shortly after the rename can leave the new
        # name pointing at data that never reached the disk.
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, filepath)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    _fsync_folder(folder or os.curdir)


def _fsync_folder(folder):
    # Best effort: the file is in place already. Windows cannot open a
    # folder, and some file systems refuse to flush one.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
