"""One writer per output: advisory lock files, and the temporary files of writers that are gone.

A writer (a training run, a predict or export output) holds `Lock(path)` for as long as it
writes: an exclusive fcntl.flock on a small file holding the owner's pid, host and start
time. The kernel drops the lock when its owner dies however it dies (SIGKILL included), so a
lock left by a dead owner is simply taken over; a live owner makes a second writer stop with
one sentence naming it. The file is removed on release; an acquirer re-checks that the file
it locked is still the one at `path`, so removal never lets two writers in.

Temporary files are named `.<name>.<tag>-<pid>...` (`.tmp-step-N-<pid>` for resume states).
`remove_stale_temps` removes those whose process no longer exists on this machine.

Own code rather than a library (filelock, portalocker): the guarantee that matters here is
the owner record in the refusal message and the takeover rule, both a few lines on flock.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

from toolkit import UserError

log = logging.getLogger(__name__)
TEMP_NAME = re.compile(r"^\..*?(?:tmp|fp32)-(?:step-\d+-)?(\d+)(?:\.[\w.]*)?$")  # the pid is group 1


class Busy(UserError):
    """Another live process holds the lock."""


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Lock:
    """An exclusive advisory lock on the file `path`, held from acquire() to release() (or exit).

    `what` names the thing protected in the refusal, e.g. "run folder 'runs/exp'".
    """

    def __init__(self, path: str | Path, what: str):
        self.path, self.what, self.fd = Path(path), what, None

    def acquire(self) -> "Lock":
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"cannot write {self.what}: cannot create '{self.path}' ({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                owner = _read_owner(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise UserError(f"cannot lock {self.what} ({e.strerror or e})") from None
                who = (f"process {owner.get('pid')} on {owner.get('host')} since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner.get('started', 0)))}"
                       if owner else "another process")
                raise Busy(f"{self.what} is being written by {who}; wait for it to finish or choose another "
                           f"output (lock file '{self.path}')") from None
            try:  # the file may have been released and removed between open and flock: lock the new one
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_owner(fd)
        if previous and previous.get("pid") != os.getpid():
            log.info("taking over %s from process %s on %s, which is gone", self.what, previous.get("pid"),
                     previous.get("host"))
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: nobody can lock this file in between
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "Lock":
        return self if self.fd is not None else self.acquire()  # a held lock is entered as it is

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _read_owner(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def lock_path(output: Path) -> Path:
    """The lock file of an output file: .<name>.lock beside it."""
    return output.with_name(f".{output.name}.lock")


def remove_stale_temps(folder: str | Path, prefix: str = ".") -> list[Path]:
    """Remove temporary files and folders in `folder` whose name starts with `prefix`, follows the
    `.<name>.<tag>-<pid>` convention, and whose process is gone; -> what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = TEMP_NAME.match(entry.name)
        if not m or not entry.name.startswith(prefix):
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or pid_alive(pid):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            continue
    if removed:
        log.info("removed %d temporary file(s) left in %s by processes that are gone", len(removed), folder)
    return removed
