"""Checkpoints: DeepSpeed ``save_checkpoint`` plus per-rank state, a crash-safe ``latest``.

Layout of one stage's checkpoint directory::

    <out_dir>/<stage>/checkpoints/
        latest                       # names the newest COMPLETE tag (written atomically, last)
        step00000100/
            mp_rank_00_model_states.pt, *_optim_states.pt ...   # DeepSpeed's files
            rank_state_00000.pt ...  # per rank: loader state, RNG states (python/numpy/torch)
            COMPLETE                 # written by rank 0 after every rank has finished writing

DeepSpeed writes its own ``latest`` from rank 0 before the final barrier, i.e. possibly while
another rank is still writing its optimizer shard. We therefore call it with
``save_latest=False``, wait for all ranks, and only then mark the tag complete and replace
``latest`` with ``os.replace`` — so ``latest`` only ever names a checkpoint that is whole, and a
crash at any point leaves the previous one loadable. Older complete tags beyond ``keep_last`` are
deleted afterwards.

Resume (``load_newest``) does not trust ``latest`` blindly: it takes the newest complete tag whose
files pass a cheap check (every ``.pt`` ends with its zip directory) and then load, agreed over
all ranks; the broken newer ones are reported by file and set aside as ``<tag>.unloadable``, and
checkpoints that exist but none loads are an error, never a silent restart from step 0.

A checkpoint written by another number of ranks is refused, naming the number to use — unless the
run sets ``data.resume_data: restart``: then rank 0 converts the tag once into DeepSpeed's
*universal* format (``<tag>/universal``, by ``deepspeed.checkpoint.ds_to_universal``) and every
rank loads its new ZeRO partition of the fp32 weights and optimizer state from it (ZeRO 0 keeps
them whole: loaded as they are). The data position cannot be re-sharded (each rank saved its own
part of the data), so it restarts with a fresh shuffle, and the RNG streams are re-seeded.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imagebert_ds.run.layout import COMPLETE
from imagebert_ds.runtime.distributed import any_rank
from imagebert_ds.runtime.distributed import barrier as _barrier
from imagebert_ds.runtime.distributed import get_rank as _rank
from imagebert_ds.runtime.distributed import get_world_size as _world
from imagebert_ds.runtime.errors import TrainingError

log = logging.getLogger("imagebert_ds.run")


@dataclass
class CheckpointConfig:
    """How often checkpoints are written and how many complete ones are kept."""
    every_steps: int = 0  # 0: only at stage end and on SIGTERM
    keep_last: int = 2

    def __post_init__(self):
        if self.every_steps < 0 or self.keep_last < 1:
            raise ValueError("checkpoint.every_steps must be >= 0 and checkpoint.keep_last >= 1")



def step_tag(step: int) -> str:
    """The checkpoint tag of ``step``: ``stepNNNNNNNN`` (sorts by step)."""
    return f"step{step:08d}"


def rng_state() -> dict:
    """This process's python / numpy / torch (and CUDA) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    """Saves and finds checkpoints of one stage. All ranks call ``save``/``load``."""

    def __init__(self, directory: str | os.PathLike, keep_last: int = 2):
        self.dir = Path(directory)
        self.keep_last = keep_last

    # ---- discovery ---------------------------------------------------------------------------
    def complete_tags(self) -> list[str]:
        """Tags holding a ``COMPLETE`` marker, oldest first."""
        if not self.dir.is_dir():
            return []
        tags = [p.name for p in self.dir.iterdir()
                if p.is_dir() and "." not in p.name and (p / COMPLETE).is_file()]
        return sorted(tags)  # "stepNNNNNNNN.unloadable" (set aside on resume) is not a tag

    def latest_tag(self) -> str | None:
        """The tag named by ``latest``, if that checkpoint is complete."""
        latest = self.dir / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        return tag if (self.dir / tag / COMPLETE).is_file() else None

    # ---- save / load ---------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict, rank_state: dict) -> str:
        """Write checkpoint ``step`` on every rank; once all ranks are done, mark it complete,
        point ``latest`` at it and prune old ones. Returns the tag."""
        tag = step_tag(step)
        rank = _rank()
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            stale = self.dir / tag  # a half-written copy of this tag from a crashed attempt
            if stale.exists() and not (stale / COMPLETE).exists():
                shutil.rmtree(stale)
        _barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state,
                               save_latest=False)
        path = self.dir / tag / f"rank_state_{rank:05d}.pt"
        tmp = path.with_name(path.name + ".tmp")
        torch.save({**rank_state, "world_size": _world()}, tmp)
        os.replace(tmp, path)
        _barrier()  # every rank's files are on disk
        if rank == 0:
            _atomic_write_text(self.dir / tag / COMPLETE, f"{tag}\n")
            _atomic_write_text(self.dir / "latest", tag)
            self._prune(keep=tag)
        _barrier()
        return tag

    def load(self, engine, tag: str | None = None, reshard: bool = False) -> tuple[dict, dict]:
        """Load ``tag`` (default: latest complete); returns (client_state, this rank's state).
        A tag written by another number of ranks is refused unless ``reshard`` (see the module
        docstring); then the rank state returned is rank 0's, with ``resharded_from`` set to the
        number of ranks that wrote it."""
        tag = tag or self.latest_tag()
        if tag is None:
            raise FileNotFoundError(f"{self.dir}: no complete checkpoint to resume from")
        written = self._check_world(tag, reshard)
        if written is not None and engine.zero_optimization_stage() >= 1:
            load_path, client_state = self._load_universal(engine, tag)
        else:
            load_path, client_state = engine.load_checkpoint(str(self.dir), tag=tag)
        if load_path is None:
            raise RuntimeError(f"{self.dir / tag}: DeepSpeed could not load this checkpoint")
        path = self.dir / tag / f"rank_state_{0 if written else _rank():05d}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing per-rank state")
        try:
            rank_state = torch.load(path, weights_only=False)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a broken file
            raise RuntimeError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
        if written is not None:
            rank_state["resharded_from"] = written
        return client_state or {}, rank_state

    def _load_universal(self, engine, tag: str):
        """ZeRO 1-3 onto another number of ranks: convert ``tag`` once (rank 0) into
        ``<tag>/universal`` and load this rank's new partition from it."""
        src, dst = self.dir / tag, self.dir / tag / "universal"
        problem = None
        if _rank() == 0 and not dst.is_dir():
            tmp = dst.with_name("universal.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("%s: converting to DeepSpeed's universal checkpoint format to re-shard it "
                        "onto %d rank(s)", src, _world())
            p = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                                "--input_folder", str(src), "--output_folder", str(tmp),
                                "--num_extract_workers", "1", "--num_merge_workers", "1",
                                "--inject_missing_state"], capture_output=True, text=True)
            if p.returncode != 0:
                tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
                problem = f"{src}: conversion to a universal checkpoint failed ({tail[0]})"
            else:
                os.replace(tmp, dst)
        if any_rank(problem is not None):
            raise RuntimeError(problem or f"{src}: conversion to a universal checkpoint failed "
                               "on rank 0")
        # DeepSpeed reads this flag of its config at load time only (engine.load_checkpoint)
        cfg = engine._config
        cfg.load_universal_checkpoint, before = True, cfg.load_universal_checkpoint
        try:
            return engine.load_checkpoint(str(src), tag="universal")
        finally:
            cfg.load_universal_checkpoint = before

    def load_newest(self, engine, reshard: bool = False) -> tuple[str, dict, dict] | None:
        """Resume point: the newest checkpoint that is complete and loads, on every rank alike.

        A newer one that ``latest`` names but is missing or incomplete, or whose files do not
        load, is reported by file (a warning) and the previous one is tried; the unloadable ones
        are renamed ``<tag>.unloadable`` (kept for inspection, out of pruning's count) once one
        has loaded. None when the directory holds no checkpoint at all (a fresh start); raises
        ``TrainingError`` when checkpoints exist but none loads, or were written by another
        number of ranks and ``reshard`` is off — never a silent restart."""
        if not self.dir.is_dir() or not any(self.dir.iterdir()):
            return None
        problems = []
        named = self._latest_name()
        if named is not None and not (self.dir / named / COMPLETE).is_file():
            what = "is missing" if not (self.dir / named).is_dir() else "has no COMPLETE marker"
            problems.append(f"{self.dir / 'latest'} names {named}, which {what}")
        tags = sorted(self.complete_tags(), reverse=True)
        if not tags and named is None:
            return None  # only debris of a first checkpoint that never completed
        for i, tag in enumerate(tags):
            problem = self._check_files(tag)
            if not any_rank(problem is not None):
                self._check_world(tag, reshard)
                try:
                    client, rank_state = self.load(engine, tag, reshard)
                except Exception as e:  # noqa: BLE001 - any failure: report it, try the older one
                    problem = str(e).splitlines()[0]
                if not any_rank(problem is not None):
                    if problems and _rank() == 0:
                        for p in problems:
                            log.warning("checkpoint not usable: %s", p)
                        log.warning("resuming from the older checkpoint %s", self.dir / tag)
                        self._set_aside(tags[:i])
                        _atomic_write_text(self.dir / "latest", tag)
                    _barrier()
                    return tag, client, rank_state
            problems.append(problem or f"{self.dir / tag}: failed to load on another rank")
        raise TrainingError(f"{self.dir}: checkpoints exist but none can be resumed from: "
                            + "; ".join(problems) + ". Move the directory away to start the "
                            "stage from scratch")

    def _latest_name(self) -> str | None:
        latest = self.dir / "latest"
        return latest.read_text().strip() or None if latest.is_file() else None

    def _check_files(self, tag: str) -> str | None:
        """A cheap look at a complete tag's files, without loading them: every rank's state is
        there and every ``.pt`` (a zip archive) ends with its directory, which a truncated or
        half-copied file lacks. None when it looks whole, else the problem, naming the file."""
        d = self.dir / tag
        if not (d / f"rank_state_{0:05d}.pt").is_file():
            return f"{d / 'rank_state_00000.pt'} is missing"
        for f in sorted(d.glob("*.pt")):
            try:
                with zipfile.ZipFile(f):
                    pass
            except (zipfile.BadZipFile, OSError) as e:
                return f"{f} is truncated or corrupt ({e})"
        return None

    def _check_world(self, tag: str, reshard: bool = False) -> int | None:
        """The number of ranks that wrote ``tag`` when it differs from this run's (None when
        equal or unknown). Refused, clearly, unless ``reshard``: each rank's data position is
        its own part of the data."""
        d = self.dir / tag
        try:
            written = torch.load(d / "rank_state_00000.pt", weights_only=False).get("world_size")
        except Exception:  # noqa: BLE001 - unreadable: load() reports it, naming the file
            return None
        if written is None or written == _world():
            return None
        if not reshard:
            raise TrainingError(f"{d}: written by {written} rank(s), this run has {_world()}: "
                                f"resume with {written} ranks (--nproc {written}); each rank's "
                                "data position is saved for its own part of the data. Or set "
                                "data.resume_data=restart to re-shard the weights and optimizer "
                                f"state onto {_world()} rank(s) and restart the data position")
        return written

    def _set_aside(self, tags: list[str]) -> None:
        for t in tags:
            os.replace(self.dir / t, self.dir / f"{t}.unloadable")
            log.warning("moved the unloadable checkpoint aside: %s.unloadable", self.dir / t)

    def _prune(self, keep: str) -> None:
        tags = self.complete_tags()
        old = [t for t in tags if t != keep][: max(0, len(tags) - self.keep_last)]
        for t in old:
            shutil.rmtree(self.dir / t, ignore_errors=True)
        # Incomplete tags older than the newest complete one are debris from a crash.
        for p in self.dir.iterdir():
            if p.is_dir() and not (p / COMPLETE).exists() and p.name < keep:
                shutil.rmtree(p, ignore_errors=True)


def consolidated_state_dict(ckpt_dir: str | os.PathLike, tag: str, zero_stage: int
                            ) -> dict[str, Any]:
    """Full fp32 weights of checkpoint ``tag`` in ``ckpt_dir``, on the CPU, without an engine.

    ZeRO 1-3 keep the fp32 master weights partitioned in the optimizer shards: DeepSpeed's
    ``zero_to_fp32`` rebuilds them. ZeRO 0 saves the module whole (16-bit under bf16/fp16): its
    weights are cast to fp32.
    """
    tag_dir = Path(ckpt_dir) / tag
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if zero_stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag)
    else:
        path = tag_dir / "mp_rank_00_model_states.pt"
        if not path.is_file():
            raise ValueError(f"checkpoint {tag_dir}: {path.name} missing")
        sd = torch.load(path, map_location="cpu", weights_only=False)["module"]
    return {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
            for k, v in sd.items()}
