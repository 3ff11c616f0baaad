"""The pre-training loader the trainer iterates: a resumable, infinite stream of contract batches.

``build_pretrain_loader(cfg, rank, world_size, device)`` builds one DALI pipeline per source
(``dali_source``), mixes sources sample by sample with the configured ratios, picks one caption per
visit when a sample's ``.txt`` holds several (one per line), and hands the samples to one batch
builder (``collator.PretrainCollator.begin``: tokenizes with the HF fast tokenizer, masks, copies
the features) — in a background thread, ``prefetch_batches`` ahead, into pinned buffers when the
device is a GPU (so the trainer's ``non_blocking`` copy is asynchronous). Samples are decoded and
checked in ``decode``. Every random choice outside DALI comes from one numpy ``Generator``
seeded from ``cfg.seed`` and ``rank``; its state and each pipeline's DALI checkpoint form
``state_dict()``, so a restored loader yields exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import atexit
import copy
import functools
import json
import logging
import queue
import threading
import weakref
from pathlib import Path
from typing import NamedTuple

import numpy as np

from imagebert_ds.config_utils import ConfigError
from imagebert_ds.data.captions import CaptionEncoder
from imagebert_ds.data.collator import BatchHandle, PretrainCollator, Sample
from imagebert_ds.data.config import DataConfig, load_tokenizer
from imagebert_ds.data.copy_engine import copy_threads
from imagebert_ds.data.dali_source import SourceStream, plan_source
from imagebert_ds.data.decode import NONFINITE_FEATURES, Rejected, decode_batch, nonfinite_rows
from imagebert_ds.data.shards.format import BadSampleError, split_sample_key

log = logging.getLogger(__name__)
STATE_VERSION = 1


class PretrainLoader:
    """Infinite iterator of batch dicts (CPU torch tensors, docs/batch_contract.md keys).

    With ``cfg.prefetch_batches > 0`` a background thread reads, tokenizes and collates up to that
    many batches ahead of the caller (DALI, numpy copies and the tokenizer release the GIL, so
    this overlaps with the training step); each batch travels with a snapshot of the loader's
    state *after* it, and ``state_dict()`` returns the snapshot of the last batch handed out, so
    resuming never skips or repeats a batch. ``prefetch_batches: 0`` collates in the caller's
    thread (same batches, byte for byte).
    """

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, device: str = "cpu",
                 state: dict | None = None, reseed: int = 0):
        cfg.check_sources()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.device = device
        cuda = _device_id(device) is not None
        self.device_id = _device_id(device) if cfg.use_images else None
        self.tokenizer = load_tokenizer(cfg.tokenizer, cfg.max_text_len)
        self.collator = PretrainCollator.from_tokenizer(
            self.tokenizer, max_regions=cfg.max_regions, region_feat_dim=cfg.region_feat_dim,
            mlm_prob=cfg.mlm_prob, region_mask_prob=cfg.region_mask_prob,
            itm_neg_prob=cfg.itm_neg_prob, use_regions=cfg.use_regions, use_images=cfg.use_images,
            region_dtype=cfg.region_dtype, pin_memory=cuda,
            read_threads=copy_threads(cfg.num_threads),
            encode=CaptionEncoder(self.tokenizer))  # ASCII captions skip the Rust normalizer
        self.plans = [plan_source(s.path, cfg.use_images, cfg.use_regions, cfg.missing_component,
                                  cfg.on_bad_sample) for s in cfg.sources]
        for p in self.plans:
            if p.num_samples < world_size:
                raise ConfigError(f"{p.path}: {p.num_samples} usable samples, fewer than the "
                                  f"{world_size} ranks")
        ratios = np.asarray([s.ratio for s in cfg.sources], np.float64)
        self.ratios = ratios / ratios.sum()
        self.skipped = sum(p.skipped for p in self.plans)
        # reseed > 0: a restarted position on changed data (load_state_dict, resume_data: restart)
        self._rng = np.random.default_rng([cfg.seed, rank, 0x1B] + ([reseed] if reseed else []))
        self.samples_seen = 0
        self.batches = 0
        self._bad_count = 0  # skipped by on_bad_sample: skip (the producer's; cumulative)
        self._repaired = 0  # rows with NaN/inf features replaced (the caller's; cumulative)
        self._records: list[dict] = []  # bad-sample log lines of the batch being produced
        self._bad_run = [0] * len(cfg.sources)  # consecutive bad samples per source
        self._bad_log = self._bad_log_path = None
        if state is not None:
            self._check_state(state)
            self._rng.bit_generator.state = state["rng"]
            self.samples_seen, self.batches = state["samples_seen"], state["batches"]
            self._repaired = state.get("repaired", 0)
            self._bad_count = state.get("bad_samples", 0) - self._repaired
        decode = functools.partial(decode_batch, feat_dim=cfg.region_feat_dim,
                                   use_regions=cfg.use_regions, use_images=cfg.use_images)
        self.streams = [
            SourceStream(p, rank=rank, world=world_size,
                         state=None if state is None else state["sources"][i],
                         batch=cfg.read_batch,
                         seed=(cfg.seed + 1000 * i + 7919 * reseed) % 2 ** 31,
                         num_threads=cfg.num_threads,
                         prefetch=cfg.prefetch, shuffle_buffer=cfg.shuffle_buffer,
                         image_size=cfg.image_size, image_fit=cfg.image_fit,
                         device_id=self.device_id,
                         policy=cfg.missing_component, decode=decode)
            for i, p in enumerate(self.plans)]
        self._state = self._caller_state(self._snapshot())  # the caller's (last batch out)
        self._worker: _Prefetcher | None = None
        self._closed = False

    # --- iteration ----------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._closed:
            raise RuntimeError("the loader was closed")
        if self.cfg.prefetch_batches == 0:
            made = self._produce()
            state = self._snapshot()
        else:
            if self._worker is None:
                self._worker = _Prefetcher(self, self.cfg.prefetch_batches)
            made, state = self._worker.get()
        records = list(made.records)
        batch = made.handle.result()  # the features are in the buffer (re-raises a copy error)
        if made.handle.feats_finite is False:
            records += self._repair(batch, made.keys, state["batches"])
        self._state = self._caller_state(state)
        self._write_log(records)
        return batch

    def _repair(self, batch: dict, keys: list[str], batch_no: int) -> list[dict]:
        """Rows of ``batch`` whose region features hold NaN/inf (found as they were copied,
        after the batch was formed; ``keys``: each row's sample key): each is replaced by a
        copy of the next good row, every key of the batch. No sample is drawn for it, so the
        stream and the rng are those of a clean batch: the batches after it do not depend on
        when the copies finished (exact resume). Under ``on_bad_sample: error`` it raises,
        naming shard and key. Returns the bad-sample log lines."""
        feats = batch["region_feats"].numpy()
        bad = nonfinite_rows(feats)
        good = [i for i in range(len(feats)) if i not in set(bad)]
        if self.cfg.on_bad_sample == "error" or not good:
            shard, name = split_sample_key(keys[bad[0]])
            why = ("" if good else f"; every sample of batch {batch_no} has them (with "
                   "data.on_bad_sample=skip too)")
            raise BadSampleError(f"{shard}: sample '{name}': {NONFINITE_FEATURES}"
                                 f"{why} (data.on_bad_sample=error; 'skip' replaces such "
                                 "rows and lists them in the run directory)")
        records = []
        for i in bad:
            g = next((j for j in good if j > i), good[0])
            for v in batch.values():
                v[i] = v[g]
            shard, name = split_sample_key(keys[i])
            records.append({"batch": batch_no, "shard": shard, "key": name,
                            "reason": f"{NONFINITE_FEATURES} (row {i} of the batch "
                                      f"replaced by a copy of row {g})"})
            self._repaired += 1
        log.warning("batch %d: %d row(s) with non-finite region features replaced by copies "
                    "of other rows (first: %s)", batch_no, len(bad), keys[bad[0]])
        return records

    def _write_log(self, records: list[dict]) -> None:
        """The bad-sample log lines of the batch just handed out (written by the caller, in
        batch order, whatever the producer thread is doing meanwhile)."""
        if self._bad_log is not None and records:
            self._bad_log.write("".join(json.dumps(r) + "\n" for r in records))
            self._bad_log.flush()

    def _produce(self) -> "_Made":
        """Pick one batch's samples and begin it (the producer's side; the only user of the rng
        and the streams): the handle of a batch whose feature copies go on on the collator's
        threads while the next batch is picked. A bad sample (``decode``'s ``Rejected``) is
        replaced by the next one of the same source (``data.on_bad_sample: skip``) -- a
        function of the data and the loader state only, so a resumed loader drops exactly the
        samples an uninterrupted one would. NaN/inf features show only as they are copied; the
        caller repairs such rows (``_repair``)."""
        cfg = self.cfg
        which = [int(i) for i in
                 self._rng.choice(len(self.streams), size=cfg.batch_size, p=self.ratios)]
        samples, captions = self._pick(which)
        handle = self.collator.begin(samples, self._rng, captions, checked=True)
        for i in set(which):  # a batch was made: these sources are not all bad
            self._bad_run[i] = 0
        self.samples_seen += len(samples)
        self.batches += 1
        records, self._records = self._records, []
        return _Made(handle, [s.key for s in samples], records)

    def _pick(self, which: list[int]) -> tuple[list[Sample], list[str]]:
        """The next good sample of each source in ``which`` and the caption drawn for each."""
        picked, captions = [], []
        for i in which:
            s = self.streams[i].next()
            while isinstance(s, Rejected):
                self._reject(s.key, i, s.reason)
                s = self.streams[i].next()
            caps = s.captions
            captions.append(caps[int(self._rng.integers(len(caps)))] if len(caps) > 1 else caps[0])
            picked.append(s)
        return picked, captions

    def _reject(self, key: str, source: int, reason: str) -> None:
        """A bad sample of source ``source``: an error naming shard and key (policy ``error``),
        else counted, listed in the bad-sample log and skipped."""
        shard, name = split_sample_key(key)
        if self.cfg.on_bad_sample == "error":
            raise BadSampleError(f"{shard}: sample '{name}': {reason} (data.on_bad_sample=error; "
                                 "'skip' drops such samples and lists them in the run directory)")
        self._bad_count += 1
        self._bad_run[source] += 1
        if self._bad_run[source] > self.streams[source].part_size:
            raise BadSampleError(f"{self.plans[source].path}: no usable sample in a whole pass "
                                 f"over rank {self.rank}'s part (last: {shard}: '{name}': {reason})")
        if self._bad_count <= 10 or self._bad_count % 1000 == 0:
            log.warning("skipping bad sample %s: '%s': %s (%d skipped so far)", shard, name,
                        reason, self._bad_count)
        self._records.append({"batch": self.batches + 1, "shard": shard, "key": name,
                              "reason": reason})

    def open_bad_sample_log(self, path) -> None:
        """List skipped samples (one JSON line: batch, shard, key, reason) in ``path``, first
        dropping lines past the current position (a resumed loader writes them again)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = []
        if path.is_file():
            keep = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["batch"] <= self.batches]
        path.write_text("".join(ln + "\n" for ln in keep))
        self._bad_log_path = path
        self._bad_log = open(path, "a")

    # --- bookkeeping --------------------------------------------------------------------------
    def _snapshot(self) -> dict:
        """The producer's position now, as ``state_dict()`` reports it."""
        sources = [s.state_dict() for s in self.streams]
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world,
                "paths": [p.path for p in self.plans], "batch_size": self.cfg.batch_size,
                "num_samples": [p.num_samples for p in self.plans],
                "read_batch": self.cfg.read_batch, "seed": self.cfg.seed,
                "rng": self._rng.bit_generator.state, "samples_seen": self.samples_seen,
                "batches": self.batches, "bad_samples": self._bad_count,
                "epoch": [st["samples_read"] / s.part_size for st, s in zip(sources, self.streams)],
                "sources": sources}

    def _caller_state(self, snapshot: dict) -> dict:
        """The producer's ``snapshot`` with the caller's repairs counted in: ``state_dict()``."""
        return dict(snapshot, repaired=self._repaired,
                    bad_samples=snapshot["bad_samples"] + self._repaired)

    @property
    def bad_samples(self) -> int:
        """Samples skipped or whose rows were repaired as bad (``data.on_bad_sample: skip``) as
        of the last batch handed out, over this rank's whole stage (restored on resume)."""
        return self._state.get("bad_samples", 0)

    @property
    def epoch(self) -> list[float]:
        """Epochs (fractional) through this rank's part of each source, as of the last batch
        handed out."""
        return list(self._state["epoch"])

    def state_dict(self) -> dict:
        """Everything needed to resume exactly after the last batch handed out: rng state,
        counters, each source's position."""
        return copy.deepcopy(self._state)

    def _check_state(self, state: dict) -> None:
        want = {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world,
                "paths": [p.path for p in self.plans], "read_batch": self.cfg.read_batch,
                "seed": self.cfg.seed, "num_samples": [p.num_samples for p in self.plans]}
        for k, v in want.items():
            if k == "num_samples" and k not in state:  # a state from before it was recorded
                continue
            if state.get(k) != v:
                hint = (" (the data changed since the checkpoint, e.g. the clean copy of "
                        "'imagebert-ds validate --clean-out': set data.resume_data=restart to go "
                        "on from a fresh data position)" if k in ("paths", "num_samples") else "")
                raise ConfigError(f"loader state does not match this loader: {k} is "
                                  f"{state.get(k)!r} in the state, {v!r} here{hint}")

    def close(self) -> None:
        """Stop the prefetch thread and release the DALI pipelines; the loader is unusable
        afterwards."""
        self._closed = True
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        if self._bad_log is not None:
            self._bad_log.close()
            self._bad_log = None
        for s in self.streams:
            s.close()
        self.streams = []
        self.collator.close()

    def load_state_dict(self, state: dict, restart: bool = False) -> None:
        """Restore a position saved by ``state_dict()`` (rebuilds the DALI pipelines). With
        ``restart`` (a checkpoint re-sharded onto another number of ranks; ``state`` is the old
        rank 0's), only the counters are kept and the position restarts with a fresh shuffle."""
        try:
            if restart:
                raise ConfigError(f"the loader state was written by {state.get('world_size')} "
                                  f"rank(s), this run has {self.world}")
            fresh = PretrainLoader(self.cfg, self.rank, self.world, self.device, state=state)
        except ConfigError as e:
            changed = any(state.get(k) != v for k, v in (
                ("paths", [p.path for p in self.plans]),
                ("num_samples", [p.num_samples for p in self.plans])) if k in state)
            if not restart and (self.cfg.resume_data != "restart" or not changed
                                or state.get("rank") != self.rank
                                or state.get("world_size") != self.world):
                raise
            log.warning("%s; data.resume_data=restart: the data position restarts with a fresh "
                        "shuffle (seeded by the batch count %d)", e, state["batches"])
            fresh = PretrainLoader(self.cfg, self.rank, self.world, self.device,
                                   reseed=state["batches"] + 1)
            fresh.samples_seen, fresh.batches = state["samples_seen"], state["batches"]
            fresh._repaired = state.get("repaired", 0)
            fresh._bad_count = state.get("bad_samples", 0) - fresh._repaired
            fresh._state = fresh._caller_state(fresh._snapshot())
        log_path = self._bad_log_path
        self.close()
        self.__dict__.update(fresh.__dict__)
        if log_path is not None:
            self.open_bad_sample_log(log_path)


class _Made(NamedTuple):
    """A batch as the producer hands it over: its feature copies may still run."""

    handle: BatchHandle
    keys: list[str]  # each row's sample key (shard:offset:name), for ``_repair``
    records: list[dict]  # bad-sample log lines of the samples skipped while picking it


_LIVE: "weakref.WeakSet[_Prefetcher]" = weakref.WeakSet()


@atexit.register
def _stop_prefetchers() -> None:
    """A loader left open at exit: stop its thread before the interpreter tears down (a daemon
    thread killed inside a DALI call aborts the process)."""
    for worker in list(_LIVE):
        worker.stop()


class _Prefetcher:
    """A daemon thread running ``loader._produce()`` into a bounded queue of (``_Made``, state).

    A batch goes into the queue only once its feature copies are done (the thread waits for
    batch k's after it has made batch k+1, while they ran): the caller then takes the GIL once
    per batch. Each time it does, it may wait out a switch interval (5 ms) while this thread
    runs Python; waiting for the copies itself would add one such wait per copy job, and the
    caller would fall behind the producer (measured: 0.7-0.9 ms a batch).

    An exception in the thread is handed to the caller at the batch where it happened (the
    batches before it are still delivered); ``stop()`` ends the thread at its next batch.
    """

    def __init__(self, loader: PretrainLoader, depth: int):
        _LIVE.add(self)
        self.loader = loader
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"loader-rank{loader.rank}",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        waiting = None  # the last batch made, its copies maybe still running
        while not self.halt.is_set():
            try:
                item = (self.loader._produce(), self.loader._snapshot())
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                item = e
            if waiting is not None and not self._put(waiting):
                return
            waiting = item
            if isinstance(item, BaseException):
                self._put(item)
                return

    def _put(self, item) -> bool:
        """``item`` into the queue once its copies are done (an error in them is raised by
        the caller, at that batch); False when stopped meanwhile."""
        if not isinstance(item, BaseException):
            item[0].handle.wait()
        while not self.halt.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> tuple["_Made", dict]:
        """The next (batch made, state after it); re-raises the producer's error."""
        while True:
            try:
                item = self.queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    raise RuntimeError("the loader's prefetch thread died") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        """Stop the thread and drop what it prefetched."""
        self.halt.set()
        self.thread.join(timeout=30)


def _device_id(device: str) -> int | None:
    if device == "cpu":
        return None
    if device.startswith("cuda"):
        if ":" in device:
            return int(device.split(":", 1)[1])
        import torch
        return torch.cuda.current_device()
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def build_pretrain_loader(cfg: DataConfig, rank: int, world_size: int,
                          device: str = "cpu") -> PretrainLoader:
    """The trainer's entry point: an infinite, resumable iterator of batch dicts for this rank."""
    return PretrainLoader(cfg, rank, world_size, device)
