"""One run per output directory: ``<out_dir>/run.lock`` names the process that trains into it.

Rank 0 creates the file with ``O_CREAT | O_EXCL`` (atomic, also on NFS v3+) holding its host, pid
and the pid's start time. A second run into the same ``out_dir`` is refused with a message naming
the holder — two runs would interleave ``metrics.jsonl`` and overwrite each other's checkpoints.
A lock left by a run that was killed (SIGKILL, a node lost: no ``finally`` ran) is stale when its
host is this one and its pid is gone (or is a newer process with the same pid): it is taken over
with a warning. So is the lock of an earlier attempt of the same Slurm job (``$SLURM_JOB_ID``:
Slurm runs one attempt of a job at a time, so a requeued job on another node takes its own lock
over). Any other lock from another host cannot be checked from here; the message says to delete
it by hand if that run is really gone.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from imagebert_ds.runtime.errors import TrainingError

log = logging.getLogger("imagebert_ds.runtime")
LOCK_NAME = "run.lock"


class RunLockedError(TrainingError):
    """``out_dir`` is in use by another live run."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in (...) may hold spaces


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    now = _start_time(pid)
    return started is None or now is None or now == started  # else: the pid was reused


class RunLock:
    """The lock of one run directory (``acquire`` / ``release`` on rank 0; ``check`` anywhere)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LOCK_NAME
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "pid_start": _start_time(os.getpid()),
                   "slurm_job": os.environ.get("SLURM_JOB_ID"),
                   "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.held = False

    def holder(self) -> dict | None:
        """The lock file's content; None when absent or unreadable (mid-write or junk)."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _is_stale(self, h: dict) -> bool:
        if self.me["slurm_job"] and h.get("slurm_job") == self.me["slurm_job"]:
            return True  # an earlier attempt of this very job (requeued)
        return h.get("host") == self.me["host"] and not _alive(int(h.get("pid", -1)),
                                                               h.get("pid_start"))

    def _refuse(self, h: dict) -> RunLockedError:
        hint = ("" if h.get("host") == self.me["host"] else
                f"; it cannot be checked from {self.me['host']}: if that run is gone, delete "
                f"{self.path}")
        return RunLockedError(f"run.out_dir {self.path.parent} is in use by another run: pid "
                              f"{h.get('pid')} on host {h.get('host')} since {h.get('since')} "
                              f"(lock {self.path}){hint}. Wait for it, stop it, or choose "
                              "another run.out_dir")

    def check(self) -> None:
        """Raise ``RunLockedError`` when a live run holds the lock (nothing is written)."""
        h = self.holder()
        if h is not None and not self._is_stale(h):
            raise self._refuse(h)

    def acquire(self) -> None:
        """Take the lock, or take over a stale one; ``RunLockedError`` when a live run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(self.me)
        for attempt in range(50):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                h = self.holder()
                if h is None:  # being written right now, or junk: look again, then take it
                    if attempt < 20:
                        time.sleep(0.05)
                        continue
                elif not self._is_stale(h):
                    raise self._refuse(h) from None
                log.warning("taking over the stale lock %s of pid %s on %s (that process is "
                            "gone)", self.path, h and h.get("pid"), h and h.get("host"))
                tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}")
                tmp.write_text(data)
                os.replace(tmp, self.path)
                if (self.holder() or {}).get("pid") == self.me["pid"]:  # not lost to a racer
                    self.held = True
                    return
                continue
            with os.fdopen(fd, "w") as f:
                f.write(data)
            self.held = True
            return
        raise RunLockedError(f"{self.path}: could not take the lock")

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held and (self.holder() or {}).get("pid") == self.me["pid"]:
            self.path.unlink(missing_ok=True)
        self.held = False
