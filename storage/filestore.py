"""The node's file store: received instances and produced objects on disk.

Layout under the root (every component sanitised, see :func:`safe_component`)::

    instances/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    results/<StudyInstanceUID>/<name>

Paths handed to the database are *relative to the root* (POSIX form), so the store can
move. Every write is atomic and durable (:meth:`FileStore.write_atomic`): a reader sees
either no file or the complete file, never a partial one, and a write that returned
survives power loss. A free-space floor (``min_free_mb``) is checked before writing, so
the C-STORE handler can answer 0xA700 "out of resources" instead of filling the disk.

A ``FileStore`` holds no mutable state: one object can be shared by threads, and
several processes can use the same root.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from storage.errors import DiskFullError, StorageError

__all__ = ["FileStore", "StoredFile", "safe_component"]

logger = logging.getLogger(__name__)

INSTANCES_DIR = "instances"
RESULTS_DIR = "results"
TEMP_PREFIX = ".tmp-"
TEMP_SUFFIX = ".part"

_MB = 1024 * 1024
_UNSAFE = re.compile(r"[^0-9A-Za-z._-]")
_SUFFIX = re.compile(r"^(\.[0-9A-Za-z]{1,16})?$")
_MAX_COMPONENT = 64
_MKDIR_RETRIES = 10
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def safe_component(name: str, value: str) -> str:
    """Turn a UID (or object name) into one safe path component.

    A valid UID (digits and dots, at most 64 characters) is returned unchanged.
    Anything else — characters outside ``[0-9A-Za-z._-]``, a leading dot (``..``,
    hidden files), more than 64 characters — is replaced by ``_``/cut and suffixed
    with 12 hex digits of the value's SHA-256, so two different values never share a
    component and none can climb out of its directory.

    Parameters
    ----------
    name : str
        The argument's name, for error messages.
    value : str
        The UID or name.

    Raises
    ------
    TypeError
        ``value`` is not a str.
    ValueError
        ``value`` is empty.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} must not be empty")
    safe = _UNSAFE.sub("_", value)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if safe == value and len(safe) <= _MAX_COMPONENT:
        return safe
    tag = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{safe[: _MAX_COMPONENT - 13]}_{tag}"


@dataclass(frozen=True)
class StoredFile:
    """A file :meth:`FileStore.write_atomic` wrote.

    Attributes
    ----------
    relpath : str
        Path relative to the store root, POSIX form (what the database stores).
    path : Path
        Absolute path.
    digest : str
        SHA-256 of the content, 64 lowercase hex digits.
    size : int
        Size in bytes.
    """

    relpath: str
    path: Path
    digest: str
    size: int


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover - only on odd file systems
        logger.warning("could not remove temporary file %s: %s", path, exc)


class FileStore:
    """Durable storage of received instances and produced objects under one root.

    Parameters
    ----------
    root : Path
        The store's directory; created (with parents) when missing.
    min_free_mb : int
        Free space, in MiB, that must remain on the root's file system after a write.

    Raises
    ------
    TypeError
        ``root`` is not a path or ``min_free_mb`` not an int.
    ValueError
        ``min_free_mb`` is negative.
    StorageError
        ``root`` exists but is not a directory.
    """

    def __init__(self, root: Path | str, *, min_free_mb: int) -> None:
        if not isinstance(root, str | os.PathLike):
            raise TypeError(f"root must be a path, got {type(root).__name__}")
        if isinstance(min_free_mb, bool) or not isinstance(min_free_mb, int):
            raise TypeError(f"min_free_mb must be an int, got {type(min_free_mb).__name__}")
        if min_free_mb < 0:
            raise ValueError(f"min_free_mb must be >= 0, got {min_free_mb}")
        root_path = Path(root)
        if root_path.exists() and not root_path.is_dir():
            raise StorageError(f"root {root_path} exists and is not a directory")
        root_path.mkdir(parents=True, exist_ok=True)
        self._root = root_path.resolve()
        self.min_free_mb = min_free_mb

    @property
    def root(self) -> Path:
        """The store's root directory (absolute, symlinks resolved)."""
        return self._root

    def __repr__(self) -> str:
        return f"FileStore({str(self._root)!r}, min_free_mb={self.min_free_mb})"

    # ------------------------------------------------------------------ layout

    def instance_path(
        self, study_uid: str, series_uid: str, sop_uid: str, suffix: str = ".dcm"
    ) -> Path:
        """Where a received instance lives, RELATIVE to the root.

        ``instances/<study>/<series>/<sop><suffix>``, each UID through
        :func:`safe_component`. Pass it to :meth:`write_atomic`; store
        ``StoredFile.relpath`` in the database; :meth:`resolve` gives the absolute path.

        Raises
        ------
        TypeError, ValueError
            A UID is not a non-empty str, or ``suffix`` is not ``""`` or ``.`` plus up to
            16 letters/digits.
        """
        if not isinstance(suffix, str) or not _SUFFIX.match(suffix):
            raise ValueError(f"suffix must be '' or like '.dcm', got {suffix!r}")
        return Path(
            INSTANCES_DIR,
            safe_component("study_uid", study_uid),
            safe_component("series_uid", series_uid),
            safe_component("sop_uid", sop_uid) + suffix,
        )

    def results_dir(self, study_uid: str) -> Path:
        """Directory of a study's produced objects, RELATIVE to the root.

        ``results/<study>``; created by the first :meth:`write_atomic` into it.
        """
        return Path(RESULTS_DIR, safe_component("study_uid", study_uid))

    def result_path(self, study_uid: str, name: str) -> Path:
        """Path of one produced object, RELATIVE to the root: ``results/<study>/<name>``.

        ``name`` goes through :func:`safe_component` too (e.g. ``"<SOPInstanceUID>.dcm"``).
        """
        return self.results_dir(study_uid) / safe_component("name", name)

    def resolve(self, relpath: str | os.PathLike[str]) -> Path:
        """Absolute path of a path relative to the root (an absolute one must lie inside).

        Raises
        ------
        ValueError
            The path is empty, names the root itself, or lies outside the root.
        """
        if not isinstance(relpath, str | os.PathLike):
            raise TypeError(f"relpath must be a path, got {type(relpath).__name__}")
        raw = os.fspath(relpath)
        if not isinstance(raw, str) or not raw:
            raise ValueError(f"relpath must be a non-empty path, got {relpath!r}")
        given = Path(raw)
        if ".." in given.parts:
            raise ValueError(f"relpath must not contain '..', got {raw!r}")
        candidate = given if given.is_absolute() else self._root / given
        # Resolve symlinks in what exists, so a link cannot lead out of the root either.
        resolved = candidate.resolve()
        if resolved == self._root or not resolved.is_relative_to(self._root):
            raise ValueError(f"relpath {raw!r} is not a file path inside the store root")
        return resolved

    def relative(self, path: str | os.PathLike[str]) -> str:
        """The POSIX path relative to the root of a path inside the store."""
        return PurePosixPath(self.resolve(path).relative_to(self._root)).as_posix()

    # ------------------------------------------------------------------ space

    def free_bytes(self) -> int:
        """Free bytes on the root's file system (for an unprivileged user)."""
        return shutil.disk_usage(self._root).free

    def ensure_free_space(self, expected_bytes: int = 0) -> int:
        """Check that writing ``expected_bytes`` keeps free space above the floor.

        Call it BEFORE receiving/writing (the C-STORE handler maps the error to 0xA700).

        Returns
        -------
        int
            Free bytes now.

        Raises
        ------
        DiskFullError
            Free space minus ``expected_bytes`` would fall below ``min_free_mb``.
        """
        if isinstance(expected_bytes, bool) or not isinstance(expected_bytes, int):
            raise TypeError(f"expected_bytes must be an int, got {type(expected_bytes).__name__}")
        if expected_bytes < 0:
            raise ValueError(f"expected_bytes must be >= 0, got {expected_bytes}")
        free = self.free_bytes()
        floor = self.min_free_mb * _MB
        if free - expected_bytes < floor:
            raise DiskFullError(
                f"not enough free space in {self._root}: {free / _MB:.1f} MiB free, "
                f"{expected_bytes / _MB:.1f} MiB to write, floor min_free_mb="
                f"{self.min_free_mb} MiB",
                free_bytes=free,
                required_bytes=expected_bytes + floor,
            )
        return free

    # ------------------------------------------------------------------ writing

    def _makedirs(self, directory: Path) -> None:
        missing: list[Path] = []
        probe = directory
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        for new in reversed(missing):
            try:
                new.mkdir()
            except FileExistsError:
                continue  # another thread or process made it
            _fsync_dir(new.parent)

    def write_atomic(
        self,
        relpath: str | os.PathLike[str],
        data: bytes | bytearray | memoryview | Callable[[BinaryIO], object],
        *,
        expected_size: int = 0,
    ) -> StoredFile:
        """Write a file atomically and durably; replace any file at the same path.

        A temporary file in the target's directory is written, flushed and fsynced,
        renamed over the target, and the directory is fsynced. On any error the
        temporary file is removed: no partial file is ever visible at ``relpath``.

        Parameters
        ----------
        relpath : str or PathLike
            Target, relative to the root (e.g. from :meth:`instance_path`).
        data : bytes or callable
            The content, or a callable that writes it to the binary file object it is
            given (e.g. ``lambda fh: dataset.save_as(fh)``; it may seek).
        expected_size : int
            For a callable, the size to check free space for beforehand (0 = unknown).

        Returns
        -------
        StoredFile
            Relative and absolute path, SHA-256 and size of what was written.

        Raises
        ------
        DiskFullError
            Free space is below the floor before writing, or the disk filled up (ENOSPC,
            EDQUOT) while writing.
        TypeError
            ``data`` is neither bytes-like nor callable.
        """
        target = self.resolve(relpath)
        in_memory = isinstance(data, bytes | bytearray | memoryview)
        if not in_memory and not callable(data):
            raise TypeError(f"data must be bytes or a callable, got {type(data).__name__}")
        if isinstance(expected_size, bool) or not isinstance(expected_size, int):
            raise TypeError(f"expected_size must be an int, got {type(expected_size).__name__}")
        if in_memory:
            view = memoryview(data)  # type: ignore[arg-type]
            expected = view.nbytes
        else:
            expected = expected_size
        self.ensure_free_space(expected)

        parent = target.parent
        for attempt in range(_MKDIR_RETRIES):
            try:
                self._makedirs(parent)
                # The writer's pid and host in the name: a start-up purge can tell a
                # live writer's file from a killed one's, and another host's (which it
                # cannot check) from its own (purge_stale_temp_files).
                fd, tmp_name = tempfile.mkstemp(
                    prefix=_temp_prefix(), suffix=TEMP_SUFFIX, dir=parent
                )
                break
            except FileNotFoundError:
                # A concurrent purge_empty_dirs removed a directory we were creating or
                # about to use; once our temporary file is in it, it is no longer empty.
                if attempt == _MKDIR_RETRIES - 1:
                    raise
        try:
            with os.fdopen(fd, "wb") as fh:
                if in_memory:
                    fh.write(view)
                else:
                    data(fh)  # type: ignore[operator]
                fh.flush()
                os.fsync(fh.fileno())
            if in_memory:
                digest = hashlib.sha256(view).hexdigest()
                size = view.nbytes
            else:
                digest, size = _hash_file(Path(tmp_name))
            os.replace(tmp_name, target)
        except OSError as exc:
            _unlink_quietly(tmp_name)
            if exc.errno in _DISK_FULL_ERRNOS:
                raise DiskFullError(
                    f"disk full while writing {self.relative(target)}: {exc.strerror}",
                    free_bytes=_free_or_none(self._root),
                ) from exc
            raise
        except BaseException:
            _unlink_quietly(tmp_name)
            raise
        _fsync_dir(parent)
        relative = PurePosixPath(target.relative_to(self._root)).as_posix()
        logger.debug("stored %s (%d bytes)", relative, size)
        return StoredFile(relpath=relative, path=target, digest=digest, size=size)

    # ------------------------------------------------------------------ removal

    def remove(self, relpath: str | os.PathLike[str]) -> bool:
        """Remove a stored file. Returns False when it did not exist."""
        target = self.resolve(relpath)
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        return True

    def purge_empty_dirs(self) -> int:
        """Remove empty directories under ``instances/`` and ``results/``.

        Returns
        -------
        int
            How many directories were removed.
        """
        removed = 0
        for top in (self._root / INSTANCES_DIR, self._root / RESULTS_DIR):
            if not top.is_dir():
                continue
            for dirpath, _dirs, _files in os.walk(top, topdown=False):
                directory = Path(dirpath)
                if directory == top:
                    continue
                try:
                    directory.rmdir()
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                        raise
                else:
                    removed += 1
        return removed

    def purge_stale_temp_files(
        self,
        *,
        older_than_seconds: float = 3600.0,
        live_writers_kept: bool = False,
        other_hosts_older_than_seconds: float = 3600.0,
    ) -> list[str]:
        """Remove temporary files a killed writer left behind.

        A temporary file's name says who writes it: ``.tmp-<pid>@<host>-XXXX.part``
        (:meth:`write_atomic`). This host's writers can be checked, another host's
        cannot: on a store that several hosts share, another host's file is removed
        only once ``other_hosts_older_than_seconds`` old (a write in progress touches
        its file far more often than that), whatever the other arguments say.

        Parameters
        ----------
        older_than_seconds : float
            Only files last modified at least this long ago (0: any age).
        live_writers_kept : bool
            Keep the files whose writer (the process id in the name, on this host) is
            still running, whatever their age: for a purge at start-up while other
            processes (worker units) may be writing into the store. A file with a
            process id but no host in its name (an older calcnode's) counts as this
            host's; one with no process id at all, as a dead writer's.
        other_hosts_older_than_seconds : float
            The age from which a file another host's writer named is removed (at least
            ``older_than_seconds``).

        Returns
        -------
        list of str
            The removed files, relative to the root.
        """
        for name, value in (
            ("older_than_seconds", older_than_seconds),
            ("other_hosts_older_than_seconds", other_hosts_older_than_seconds),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        now, host = time.time(), _host_tag()
        own_limit = now - older_than_seconds
        other_limit = now - max(older_than_seconds, other_hosts_older_than_seconds)
        removed: list[str] = []
        for path in self._root.rglob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
            pid, writer_host = _writer_of(path.name)
            if writer_host is not None and writer_host != host:
                limit = other_limit
            elif live_writers_kept and pid is not None and _alive(pid):
                continue
            else:
                limit = own_limit
            try:
                if path.is_file() and path.stat().st_mtime <= limit:
                    path.unlink()
                    removed.append(PurePosixPath(path.relative_to(self._root)).as_posix())
            except FileNotFoundError:
                continue
        if removed:
            logger.warning("removed %d stale temporary file(s)", len(removed))
        return sorted(removed)


#: ``.tmp-<pid>@<host>-XXXX.part`` (``XXXX``: mkstemp's letters, digits and ``_``, no
#: ``-``), or an older calcnode's ``.tmp-<pid>-XXXX.part``.
_WRITER = re.compile(rf"^{re.escape(TEMP_PREFIX)}(\d+)(?:@(.+)-[^-]*|-.*){re.escape(TEMP_SUFFIX)}$")
_MAX_HOST_TAG = 64


def _host_tag() -> str:
    """This host's name as temporary files carry it (``[0-9A-Za-z._-]``, at most 64)."""
    return _UNSAFE.sub("_", socket.gethostname())[:_MAX_HOST_TAG] or "_"


def _temp_prefix() -> str:
    return f"{TEMP_PREFIX}{os.getpid()}@{_host_tag()}-"


def _writer_of(name: str) -> tuple[int | None, str | None]:
    """The process id and host tag a temporary file's name gives (None: not named)."""
    match = _WRITER.match(name)
    if match is None:
        return None, None
    return int(match.group(1)), match.group(2)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (not this one: the caller purges
    before it writes)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _hash_file(path: Path) -> tuple[str, int]:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest(), os.fstat(fh.fileno()).st_size


def _free_or_none(root: Path) -> int | None:
    try:
        return shutil.disk_usage(root).free
    except OSError:  # pragma: no cover
        return None
