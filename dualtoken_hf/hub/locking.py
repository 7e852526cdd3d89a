"""One writer per output folder: an exclusive lock that training runs and `dualtoken export` hold while they write.

Two processes writing checkpoints or an export into the same folder would interleave their files; the second one
fails at once instead, naming the folder and the process that holds it. The lock is `fcntl.flock` on
`<folder>/.dualtoken.lock` (non-blocking): the kernel releases it when its holder exits, also on a crash or SIGKILL,
so a dead run never blocks the next one. Not a Hub module; POSIX only.
"""

import errno
import fcntl
import os
from pathlib import Path


LOCK_FILE = ".dualtoken.lock"


class FolderInUseError(OSError):
    """Another process holds the lock of the folder."""


class FolderLock:
    """
    Exclusive lock on `folder` (created if missing), taken when the object is built or entered as a context manager
    and held until [`release`]. Raises `FolderInUseError` when another process, or another `FolderLock` of this
    process, holds it.

    The lock file holds the holder's pid (read back for the error) and is removed on release.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._handle = None
        if self.folder.exists() and not self.folder.is_dir():
            raise FileExistsError(f"{str(self.folder)!r} is a file, not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        while self._handle is None:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                handle.close()
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise FolderInUseError(
                    f"{str(self.folder)!r} is in use by another process (pid {self._holder()}, which holds "
                    f"{LOCK_FILE}): two writers in one folder would mix their files; wait for it to end or choose "
                    "another folder"
                ) from None
            # A holder that released (and removed the file) between our open and flock leaves us a lock on a
            # deleted file, which guards nothing: try again on the current file.
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            opened = os.fstat(handle.fileno())
            if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
                self._handle = handle
            else:
                handle.close()
        self._handle.truncate(0)
        self._handle.write(str(os.getpid()))
        self._handle.flush()

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self):
        """Remove the lock file and release the lock (again: nothing)."""
        if self._handle is None:
            return
        self.path.unlink(missing_ok=True)
        self._handle.close()
        self._handle = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc_info):
        self.release()


__all__ = ["LOCK_FILE", "FolderInUseError", "FolderLock"]
