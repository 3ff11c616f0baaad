"""Partial score rows on disk, so that a killed evaluation restarts where it stopped.

Layout (``imagebert-ds evaluate --out FILE`` uses ``FILE.partial/``, one sub-folder per COCO 1K
fold)::

    FILE.partial/[foldF/]
        meta.json                          # the fingerprint of the arguments (rank 0 writes it)
        <start ns>-r<rank>-<seq>.pt        # rows finished since the previous save, per rank

Each ``.pt`` holds ``{"images": [i, ...], "texts": [LongTensor or None, ...], "scores":
[FloatTensor, ...]}``: the image row, the caption indices scored for it (None = all) and their
scores. Files are written to a temporary name and renamed into place (``os.replace``), so a crash
leaves either the whole file or none of it; a row is only ever saved complete. Rows are saved every
``save_every_s`` seconds and when the loop is left by an exception (Ctrl-C, SIGTERM turned into
``SystemExit``); a SIGKILL loses at most the rows since the last save.

On restart, rank 0 reads every file (whatever the number of ranks that wrote them): a row is
reused when its caption list is the one needed now, so the result is the same as an uninterrupted
run. A ``meta.json`` that differs from the current arguments is an error naming the keys (``fresh``
discards the old rows instead).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

META = "meta.json"


class PartialRows:
    """This rank's pending rows and, on rank 0, the rows saved by earlier attempts.

    ``directory`` None disables saving (the trainer's in-run evaluation).
    """

    def __init__(self, directory: str | os.PathLike | None, fingerprint: dict, rank: int = 0,
                 save_every_s: float = 60.0, fresh: bool = False):
        self.dir = Path(directory) if directory is not None else None
        self.fingerprint = json.loads(json.dumps(fingerprint))  # plain JSON types, as re-read
        self.rank = rank
        self.save_every_s = save_every_s
        self.fresh = fresh
        self._pending: dict[str, list] = {"images": [], "texts": [], "scores": []}
        self._last_save = time.monotonic()
        self._seq = 0
        self._tag = f"{time.time_ns()}-r{rank:03d}"

    @property
    def enabled(self) -> bool:
        """Whether rows are saved at all."""
        return self.dir is not None

    # ---- rank 0: check the arguments, read earlier rows ----------------------------------------
    def open(self) -> dict[int, tuple[torch.Tensor | None, torch.Tensor]]:
        """Rank 0: create the folder (or check its ``meta.json``) and return the saved rows,
        ``{image: (texts or None, scores)}``. Other ranks get ``{}``."""
        if self.dir is None or self.rank != 0:
            return {}
        meta = self.dir / META
        if meta.is_file():
            old = json.loads(meta.read_text())
            if old != self.fingerprint:
                diff = sorted(k for k in set(old) | set(self.fingerprint)
                              if old.get(k) != self.fingerprint.get(k))
                if not self.fresh:
                    raise ValueError(
                        f"{self.dir}: partial results of an evaluation with other arguments "
                        f"(differing: {', '.join(diff)}); rerun with the same arguments to "
                        f"continue it, or pass --fresh (or delete the folder) to start over")
                log.warning("%s: discarding partial results (differing: %s)", self.dir, diff)
                shutil.rmtree(self.dir)
        elif self.dir.exists() and self.fresh:
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not meta.is_file():
            _atomic_write(meta, lambda f: f.write(json.dumps(self.fingerprint, indent=1).encode()))
        rows: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        for path in sorted(self.dir.glob("*.pt")):  # names sort by start time: later ones win
            try:
                data = torch.load(path, weights_only=True)
            except Exception as e:  # a renamed file is whole; anything else is not ours
                raise ValueError(f"{path}: unreadable partial results ({e}); delete it") from None
            for i, t, s in zip(data["images"], data["texts"], data["scores"]):
                rows[int(i)] = (t, s)
        if rows:
            log.info("%s: %d score rows from an earlier run", self.dir, len(rows))
        return rows

    # ---- every rank: save finished rows ----------------------------------------------------------
    def add(self, image: int, texts: torch.Tensor | None, scores: torch.Tensor) -> None:
        """Queue one finished row; saved at the next ``maybe_save`` past the interval."""
        if self.dir is None:
            return
        self._pending["images"].append(int(image))
        self._pending["texts"].append(None if texts is None else texts.clone())
        self._pending["scores"].append(scores.clone())

    def maybe_save(self) -> None:
        """Save the queued rows when ``save_every_s`` has passed since the last save."""
        if self.dir is not None and time.monotonic() - self._last_save >= self.save_every_s:
            self.save()

    def save(self) -> None:
        """Write the queued rows now (one new file), if there are any."""
        self._last_save = time.monotonic()
        if self.dir is None or not self._pending["images"]:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{self._tag}-{self._seq:06d}.pt"
        payload = self._pending
        _atomic_write(path, lambda f: torch.save(payload, f))
        self._seq += 1
        self._pending = {"images": [], "texts": [], "scores": []}


def remove(directory: str | os.PathLike) -> None:
    """Delete a finished evaluation's partial folder."""
    shutil.rmtree(directory, ignore_errors=True)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
