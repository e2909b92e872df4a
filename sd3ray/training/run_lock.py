"""One writer per run folder: an OS file lock that the kernel releases when its process ends, so a second run
with the same name stops with one message, and a crashed run never blocks the next one."""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sd3ray.errors import Sd3rayError
from sd3ray.storage import writable_folder

LOCK_FILE = "RUN.lock"


class RunInUse(Sd3rayError):
    """Another live process is writing this run folder."""


@contextmanager
def run_lock(run_dir: Path) -> Iterator[Path]:
    """Hold `run_dir/RUN.lock` for the duration. The file records the holder's PID and host, for the message a
    second writer gets; a lock left by a process that died is free again (flock locks end with their process)."""
    writable_folder(run_dir, "run folder", "point train.output_dir at a writable folder (--set train.output_dir=DIR)")
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").split() or ["?", "?"]
        os.close(fd)
        raise RunInUse(f"run folder {run_dir} is being written by PID {holder[0]} on {holder[-1]}: give this run "
                       f"another --name, or stop that one first") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield path
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
