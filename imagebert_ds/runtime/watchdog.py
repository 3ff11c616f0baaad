"""No orphaned ranks: killing the command that started them ends them.

``imagebert-ds pretrain --nproc N`` (and ``evaluate --nproc``, the demo) start the deepspeed
launcher, which starts a per-node launcher, which starts the ranks. Killing the command with
SIGKILL runs none of its code, and DeepSpeed's local launcher forwards no signal, so without this
the ranks would keep training as orphans (beside the next ``--resume``). Three layers:

* ``launch.launch`` starts the launcher in its own process group with a parent-death signal
  (``prctl(PR_SET_PDEATHSIG, SIGTERM)`` through ctypes, Linux), and forwards SIGTERM / Ctrl-C to
  that whole group (a second Ctrl-C kills it);
* every launched rank runs ``start_orphan_watchdog``: a daemon thread that notices, within a
  second, when its parent (the per-node launcher) or the command named in ``$IMAGEBERT_PARENT_PID``
  is gone, and sends its own process SIGTERM — the trainer's usual stop: the ranks agree at the
  next step, write a checkpoint and exit;
* should that not end the rank within ``$IMAGEBERT_ORPHAN_GRACE_S`` seconds (default 120; e.g. a
  peer is already dead and a collective hangs), the watchdog exits the process.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("imagebert_ds.runtime")
PARENT_ENV = "IMAGEBERT_PARENT_PID"
GRACE_ENV = "IMAGEBERT_ORPHAN_GRACE_S"
PR_SET_PDEATHSIG = 1
_started = False


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux; a no-op
    elsewhere). Used as a ``preexec_fn``: it survives ``exec``."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def start_orphan_watchdog(interval_s: float = 1.0) -> bool:
    """Watch this rank's launchers (module docstring); True when a watch was started. Only for a
    process started by a launcher (``LOCAL_RANK`` set by it, or ``$IMAGEBERT_PARENT_PID``): a
    plain ``imagebert-ds pretrain`` keeps running when its terminal closes (nohup)."""
    global _started
    watched = []
    if "LOCAL_RANK" in os.environ:
        watched.append(("launcher", os.getppid()))
    if os.environ.get(PARENT_ENV, "").isdigit():
        watched.append(("imagebert-ds command", int(os.environ[PARENT_ENV])))
    if _started or not watched:
        return False
    _started = True
    grace = float(os.environ.get(GRACE_ENV, "120"))
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(interval_s)
            dead = [(what, pid) for what, pid in watched
                    if (os.getppid() != parent if pid == parent else _gone(pid))]
            if dead:
                break
        what, pid = dead[0]
        log.warning("the %s (pid %d) is gone: stopping this rank (checkpoint at the next step, "
                    "exit within %.0f s)", what, pid, grace)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        log.error("still running %.0f s after the %s died: exiting", grace, what)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-watchdog", daemon=True).start()
    return True
