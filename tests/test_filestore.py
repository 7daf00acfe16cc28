"""Tests of storage.filestore: atomic durable writes, layout by UID, free-space floor."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO

import pytest

from storage.errors import DiskFullError, StorageError
from storage.filestore import FileStore, safe_component

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.2"
SOP = "1.2.826.0.1.3680043.8.498.3"


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store", min_free_mb=0)


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- writing


def test_write_atomic_bytes_reports_correct_digest_and_size(store: FileStore) -> None:
    data = os.urandom(100_000)
    rel = store.instance_path(STUDY, SERIES, SOP)

    stored = store.write_atomic(rel, data)

    assert stored.relpath == f"instances/{STUDY}/{SERIES}/{SOP}.dcm"
    assert stored.path == store.root / stored.relpath
    assert stored.digest == hashlib.sha256(data).hexdigest()
    assert stored.size == 100_000
    assert stored.path.read_bytes() == data
    assert files_under(store.root) == [stored.relpath]  # no temporary file left


def test_write_atomic_with_a_writer_callable_hashes_what_was_written(store: FileStore) -> None:
    def writer(fh: BinaryIO) -> None:
        fh.write(b"\x00" * 132)
        fh.write(b"DICM-body")
        fh.seek(128)  # writers like pydicom may seek back to patch bytes
        fh.write(b"DICM")

    stored = store.write_atomic("results/x/obj.dcm", writer)

    expected = b"\x00" * 128 + b"DICM" + b"DICM-body"
    assert stored.path.read_bytes() == expected
    assert (stored.digest, stored.size) == (hashlib.sha256(expected).hexdigest(), len(expected))


def test_write_atomic_replaces_an_existing_file(store: FileStore) -> None:
    rel = store.instance_path(STUDY, SERIES, SOP)
    store.write_atomic(rel, b"first version")
    stored = store.write_atomic(rel, b"second")
    assert stored.path.read_bytes() == b"second"
    assert stored.size == 6


def test_write_atomic_leaves_no_partial_file_when_the_writer_raises(store: FileStore) -> None:
    rel = store.instance_path(STUDY, SERIES, SOP)

    def broken(fh: BinaryIO) -> None:
        fh.write(b"half of a dataset")
        raise RuntimeError("association aborted")

    with pytest.raises(RuntimeError, match="aborted"):
        store.write_atomic(rel, broken)
    assert not store.resolve(rel).exists()
    assert files_under(store.root) == []

    # An existing file survives a failed replacement unchanged.
    store.write_atomic(rel, b"complete and good")
    with pytest.raises(RuntimeError):
        store.write_atomic(rel, broken)
    assert store.resolve(rel).read_bytes() == b"complete and good"
    assert files_under(store.root) == [rel.as_posix()]


def test_enospc_while_writing_becomes_disk_full_error_and_removes_the_temp_file(
    store: FileStore,
) -> None:
    def fills_the_disk(fh: BinaryIO) -> None:
        fh.write(b"some bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match="disk full") as info:
        store.write_atomic("instances/a/b/c.dcm", fills_the_disk)
    assert isinstance(info.value.__cause__, OSError)
    assert files_under(store.root) == []


def test_concurrent_writers_each_get_their_complete_file(store: FileStore) -> None:
    errors: list[BaseException] = []

    def write_many(n: int) -> None:
        try:
            for i in range(20):
                rel = store.instance_path(STUDY, SERIES, f"1.{n}.{i}")
                payload = f"{n}-{i}".encode() * 100
                stored = store.write_atomic(rel, payload)
                assert stored.path.read_bytes() == payload
        except BaseException as exc:  # collected for the main thread
            errors.append(exc)

    threads = [threading.Thread(target=write_many, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(20):
        store.purge_empty_dirs()  # racing directory removal must not break writers
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert len(files_under(store.root)) == 80


def test_write_atomic_rejects_data_that_is_neither_bytes_nor_callable(store: FileStore) -> None:
    with pytest.raises(TypeError, match="data"):
        store.write_atomic("instances/x.dcm", "text")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- free space


def test_disk_full_error_when_the_floor_is_above_free_space(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store", min_free_mb=10**12)  # an exabyte floor
    with pytest.raises(DiskFullError, match="min_free_mb") as info:
        store.ensure_free_space(0)
    assert info.value.free_bytes is not None and info.value.free_bytes > 0
    assert info.value.required_bytes == 10**12 * 1024 * 1024

    with pytest.raises(DiskFullError):
        store.write_atomic(store.instance_path(STUDY, SERIES, SOP), b"x")
    assert files_under(store.root) == []  # refused before anything was written


def test_ensure_free_space_counts_the_expected_bytes(store: FileStore) -> None:
    free = shutil.disk_usage(store.root).free
    assert store.ensure_free_space(0) > 0
    with pytest.raises(DiskFullError):
        store.ensure_free_space(free + 10**12)
    with pytest.raises(DiskFullError):
        store.write_atomic("results/big.dcm", lambda fh: None, expected_size=free + 10**12)
    with pytest.raises(ValueError, match="expected_bytes"):
        store.ensure_free_space(-1)


# --------------------------------------------------------------------------- layout


def test_valid_uids_are_used_verbatim_in_the_layout(store: FileStore) -> None:
    assert store.instance_path(STUDY, SERIES, SOP).as_posix() == (
        f"instances/{STUDY}/{SERIES}/{SOP}.dcm"
    )
    assert store.results_dir(STUDY).as_posix() == f"results/{STUDY}"
    assert store.result_path(STUDY, "1.2.3.dcm").as_posix() == f"results/{STUDY}/1.2.3.dcm"
    assert store.instance_path(STUDY, SERIES, SOP, suffix="").name == SOP


@pytest.mark.parametrize(
    ("study", "series", "sop"),
    [
        ("../../..", "..", "../../etc/passwd"),
        ("/etc", "/", "\\..\\..\\x"),
        (".", "..", ".hidden"),
        ("1.2/../../3", "a\x00b", "é/../x"),
    ],
)
def test_a_uid_with_dotdot_or_slashes_cannot_escape_the_root(
    store: FileStore, study: str, series: str, sop: str
) -> None:
    rel = store.instance_path(study, series, sop)

    assert len(rel.parts) == 4 and rel.parts[0] == "instances"
    for part in rel.parts[1:]:
        assert "/" not in part and "\\" not in part and not part.startswith(".")
    stored = store.write_atomic(rel, b"payload")
    assert stored.path.is_relative_to(store.root / "instances")
    assert stored.path.parent.parent.parent == store.root / "instances"


def test_different_unsafe_uids_never_share_a_path(store: FileStore) -> None:
    names = {safe_component("uid", v) for v in ("1.2/3", "1.2_3", "1.2\\3", "1.2:3")}
    assert len(names) == 4
    assert "1.2_3" in names  # the safe one is kept verbatim
    long_uid = "1." * 40
    assert len(safe_component("uid", long_uid)) == 64
    assert safe_component("uid", long_uid) != safe_component("uid", long_uid + "9")


@pytest.mark.parametrize("bad", ["../outside", "/etc/passwd", "", "."])
def test_resolve_refuses_paths_outside_the_root(store: FileStore, bad: str) -> None:
    with pytest.raises(ValueError, match="relpath"):
        store.resolve(bad)


def test_resolve_refuses_a_symlink_that_leads_out_of_the_root(
    store: FileStore, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / "instances").mkdir()
    (store.root / "instances" / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="inside the store root"):
        store.write_atomic("instances/link/x.dcm", b"data")
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"study_uid": ""}, ValueError),
        ({"series_uid": 12}, TypeError),
        ({"suffix": "dcm"}, ValueError),
        ({"suffix": "./x"}, ValueError),
    ],
)
def test_instance_path_rejects_invalid_arguments(
    store: FileStore, kwargs: dict[str, object], error: type[Exception]
) -> None:
    args: dict[str, object] = {"study_uid": STUDY, "series_uid": SERIES, "sop_uid": SOP}
    args.update(kwargs)
    with pytest.raises(error, match=next(iter(kwargs))):
        store.instance_path(**args)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- removal


def test_remove_then_purge_empty_dirs_leaves_only_the_top_directories(store: FileStore) -> None:
    a = store.write_atomic(store.instance_path(STUDY, SERIES, "1.1"), b"a")
    b = store.write_atomic(store.instance_path(STUDY, "1.9", "1.2"), b"b")
    store.write_atomic(store.result_path(STUDY, "sr.dcm"), b"sr")

    assert store.remove(a.relpath) is True
    assert store.remove(a.relpath) is False
    assert store.purge_empty_dirs() == 1  # only the emptied series directory
    assert store.resolve(b.relpath).exists()

    store.remove(b.relpath)
    store.remove(store.result_path(STUDY, "sr.dcm"))
    assert store.purge_empty_dirs() == 3  # series, study, results/study
    assert sorted(p.name for p in store.root.iterdir()) == ["instances", "results"]


def test_purge_stale_temp_files_removes_only_old_leftovers(store: FileStore) -> None:
    directory = store.root / "instances" / "s"
    directory.mkdir(parents=True)
    old = directory / ".tmp-abc.part"
    new = directory / ".tmp-def.part"
    keep = directory / "1.2.dcm"
    for path in (old, new, keep):
        path.write_bytes(b"x")
    hour_ago = time.time() - 7200
    os.utime(old, (hour_ago, hour_ago))

    assert store.purge_stale_temp_files(older_than_seconds=3600) == ["instances/s/.tmp-abc.part"]
    assert not old.exists() and new.exists() and keep.exists()


def test_a_temporary_file_is_named_for_its_writer_process_and_host(store: FileStore) -> None:
    rel = store.instance_path(STUDY, SERIES, SOP)
    seen: list[str] = []
    store.write_atomic(rel, lambda fh: seen.extend(os.listdir(store.resolve(rel).parent)))
    host = socket.gethostname()
    assert len(seen) == 1
    assert seen[0].startswith(f".tmp-{os.getpid()}@{host}-") and seen[0].endswith(".part")


def test_a_purge_at_start_keeps_what_other_hosts_write_and_live_writers_of_this_host(
    store: FileStore,
) -> None:
    directory = store.root / "instances" / "s"
    directory.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = socket.gethostname()
    # On a shared store: a worker on another host is writing this one now; this purge
    # cannot ask that host whether its process (the same pid as a dead one here) runs.
    other_fresh = directory / f".tmp-{dead.pid}@other-host.example-wr1t1ng.part"
    # ... and that host's writer was killed long ago (a host lost mid-write).
    other_old = directory / f".tmp-{dead.pid}@other-host.example-0ld.part"
    mine_dead = directory / f".tmp-{dead.pid}@{here}-k1ll3d.part"
    mine_alive = directory / f".tmp-{os.getppid()}@{here}-wr1t1ng.part"
    for path in (other_fresh, other_old, mine_dead, mine_alive):
        path.write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    os.utime(other_old, (two_hours_ago, two_hours_ago))

    removed = store.purge_stale_temp_files(older_than_seconds=0, live_writers_kept=True)
    assert removed == sorted(store.relative(p) for p in (other_old, mine_dead))
    assert other_fresh.exists() and mine_alive.exists()
    # Another host's file waits an hour by default, and never less than any file.
    assert store.purge_stale_temp_files(older_than_seconds=0, live_writers_kept=True) == []
    assert store.purge_stale_temp_files(other_hosts_older_than_seconds=0) == []  # fresh
    everything = store.purge_stale_temp_files(
        older_than_seconds=0, other_hosts_older_than_seconds=0
    )
    assert everything == sorted(store.relative(p) for p in (other_fresh, mine_alive))


@pytest.mark.parametrize("age", [-1, "1", True])
def test_purge_stale_temp_files_refuses_a_bad_other_hosts_age(
    store: FileStore, age: object
) -> None:
    with pytest.raises((TypeError, ValueError), match="other_hosts_older_than_seconds"):
        store.purge_stale_temp_files(other_hosts_older_than_seconds=age)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- constructor


@pytest.mark.parametrize(
    ("min_free_mb", "error"),
    [(-1, ValueError), (True, TypeError), ("100", TypeError), (1.5, TypeError)],
)
def test_constructor_rejects_invalid_min_free_mb(
    tmp_path: Path, min_free_mb: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="min_free_mb"):
        FileStore(tmp_path, min_free_mb=min_free_mb)  # type: ignore[arg-type]


def test_constructor_creates_the_root_and_refuses_a_file(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "a" / "b", min_free_mb=5)
    assert store.root.is_dir() and store.min_free_mb == 5
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="not a directory"):
        FileStore(tmp_path / "file", min_free_mb=0)
