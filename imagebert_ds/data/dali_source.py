"""One DALI webdataset pipeline per (source, rank), with checkpointable position.

``fn.readers.webdataset`` reads this rank's part of the source (``shard_id=rank,
num_shards=world``; DALI splits the concatenated sample list into ``world`` contiguous parts and
moves each rank to the next part after every epoch, so ranks stay disjoint), shuffles with a seeded
buffer (``random_shuffle``, ``seed``); the small ``.npy`` arrays (boxes, classes) come out as the
raw file bytes and are parsed on the host into zero-copy views (``shards.npy.npy_views``). The large
one, ``.roi.npy`` (100 x 2048 float16 = 400 KB a sample at the paper's shape), is not read by
DALI at all: each sample's source info names its shard and key, the shard's index gives the
member's offset, and the payload is a view of the shard's memory map (``shards.reader.NpyRef``)
that the copy engine gathers into the batch buffer -- one copy of the features from shard to batch
instead of three (DALI's read into its sample buffer, its copy into the output batch, ours). Each
DALI batch's records are decoded and checked (``decode.decode_batch``) as it is parsed; a member
that cannot be read is passed on as the record's ``decode.READ_ERROR``. Images, when asked for,
are decoded with ``device="mixed"`` on a GPU or on
the CPU (``device_id=None``), resized (shorter side) and centre-cropped to ``image_size`` and
normalized to CHW float32 (ImageNet mean/std).

Resume: the pipeline is built with ``enable_checkpointing=True``; ``SourceStream`` keeps the DALI
checkpoint taken *before* the DALI batch it is currently handing out, plus how many samples of that
batch were consumed. Restoring = rebuild from that checkpoint, run once, drop the consumed samples.

Missing components are checked up front from the index files (which list every sample's
components): policy ``error`` names the shard and key; ``skip`` counts them, logs the count, and
lets DALI drop those samples (``missing_component_behavior="skip"``).
"""
from __future__ import annotations

import ctypes
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imagebert_ds.data.config import padded_side
from imagebert_ds.data.decode import READ_ERROR
from imagebert_ds.data.shards.format import BadSampleError, list_shards, split_sample_key
from imagebert_ds.data.shards.index import ensure_index
from imagebert_ds.data.shards.npy import npy_column, npy_views
from imagebert_ds.data.shards.reader import ShardFiles

log = logging.getLogger(__name__)

IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


class MissingComponentError(BadSampleError):
    """A sample lacks a component the loader needs (policy ``error``); names shard and key."""


@dataclass
class SourcePlan:
    """What to read from one source directory: shards, indices, components, sample count."""

    path: str
    shards: list[Path]
    indices: list[Path]
    exts: list[str]  # requested components
    num_samples: int  # samples DALI will see (after skipping incomplete ones)
    skipped: int
    direct: tuple[str, ...] = ()  # components read from the shard by the host (``NpyRef``)

    @property
    def dali_exts(self) -> list[str]:
        """The components DALI's reader outputs, in output order."""
        return [x for x in self.exts if x not in self.direct]


def plan_source(path: str, use_images: bool, use_regions: bool, policy: str,
                bad_policy: str = "skip") -> SourcePlan:
    """List ``path``'s shards (indexing them if needed; ``bad_policy`` = ``data.on_bad_sample``
    for empty / truncated shards) and apply the missing-component ``policy``."""
    shards, indices, entries = [], [], []
    for shard in list_shards(path):
        try:  # an empty or truncated shard: refused, or (skip) kept to its whole samples / left out
            idx, shard_entries = ensure_index(shard, "skip" if bad_policy == "skip" else "error")
        except BadSampleError as e:
            if bad_policy == "error":
                raise
            log.warning("leaving out shard %s", e)
            continue
        shards.append(shard)
        indices.append(idx)
        entries += [(shard, e) for e in shard_entries]
    if not entries:
        raise FileNotFoundError(f"{path}: the shards hold no samples")
    required = ["txt", "json"] + (["jpg"] if use_images else []) + (
        ["roi.npy", "box.npy"] if use_regions else [])
    exts = list(required)
    if use_regions and any("cls.npy" in e.components for _, e in entries):
        exts.append("cls.npy")  # optional component: requested when the source has it
    bad = [(s, e, x) for s, e in entries for x in exts if x not in e.components]
    bad_keys = {(s, e.key) for s, e, _ in bad}
    if bad:
        s, e, x = bad[0]
        if policy == "error":
            raise MissingComponentError(
                f"{s}: sample '{e.key}' has no .{x} component ({len(bad_keys)} incomplete "
                f"sample(s) in {path}; set data.missing_component=skip to drop them, or run "
                f"'imagebert-ds validate {path} --clean-out DIR')")
        log.warning("%s: skipping %d sample(s) with missing components (first: %s key '%s' "
                    "lacks .%s)", path, len(bad_keys), s, e.key, x)
    return SourcePlan(path, shards, indices, exts, len(entries) - len(bad_keys), len(bad_keys),
                      direct=("roi.npy",) if use_regions else ())


def build_pipeline(plan: SourcePlan, *, rank: int, world: int, batch: int, seed: int,
                   num_threads: int, prefetch: int, shuffle_buffer: int, image_size: int,
                   image_fit: str = "crop",
                   device_id: int | None, policy: str, checkpoint: str | None = None,
                   raw_jpg_as: list[str] | None = None):
    """The DALI pipeline; outputs follow ``plan.exts`` (npy as bytes, jpg -> CHW float32).
    ``raw_jpg_as``: instead of decoding, pass the encoded ``.jpg`` bytes through copies named
    like the image operators of the decoding pipeline (its checkpoint names them)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_checkpointing=True)
    def pipe():
        outs = fn.readers.webdataset(
            paths=[str(s) for s in plan.shards], index_paths=[str(i) for i in plan.indices],
            ext=plan.dali_exts, shard_id=rank, num_shards=world, random_shuffle=True,
            initial_fill=max(1, min(shuffle_buffer, plan.num_samples // world)), seed=seed,
            missing_component_behavior="skip" if policy == "skip" else "error",
            name="reader")
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        result = []
        for ext, o in zip(plan.dali_exts, outs):
            if ext == "jpg" and raw_jpg_as is not None:
                for name in raw_jpg_as:
                    o = fn.copy(o, name=name)
            elif ext == "jpg":
                o = fn.decoders.image(o, device="mixed" if device_id is not None else "cpu",
                                      output_type=types.RGB)
                if image_fit == "pad":  # Pixel-BERT: aspect kept, longer side capped, padded
                    side = padded_side(image_size)
                    o = fn.resize(o, resize_shorter=image_size, max_size=side)
                    o = fn.crop_mirror_normalize(o, crop=(side, side), crop_pos_x=0.0,
                                                 crop_pos_y=0.0, out_of_bounds_policy="pad",
                                                 fill_values=0.0, mean=IMAGENET_MEAN,
                                                 std=IMAGENET_STD, output_layout="CHW",
                                                 dtype=types.FLOAT)
                    result.append(o)
                    continue
                o = fn.resize(o, resize_shorter=image_size)
                o = fn.crop_mirror_normalize(o, crop=(image_size, image_size),
                                             mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                             output_layout="CHW", dtype=types.FLOAT)
            result.append(o)
        return tuple(result)

    # Without images DALI only reads a few small members per sample (the features are the
    # collator's): its thread pool then costs ~40 thread wake-ups a batch and speeds up nothing,
    # so the pipeline runs its operators on one thread (measured: 4-5% faster loader, 0.8 ms
    # less CPU a paper-shape batch); ``num_threads`` is for decoding
    decodes = "jpg" in plan.dali_exts and raw_jpg_as is None
    p = pipe(batch_size=batch, num_threads=num_threads if decodes else 1, device_id=device_id,
             prefetch_queue_depth=prefetch, seed=seed, checkpoint=checkpoint)
    p.build()
    return p


def _bytes_column(tl) -> list[bytes]:
    """Each sample's buffer of a DALI ``TensorListCPU`` of 1-D uint8 buffers (raw file
    contents), as bytes: the whole list copied at once into one array (``copy_to_external``),
    then sliced -- not a numpy view and a copy per sample."""
    lens = [shape[0] for shape in tl.shape()]
    buf = np.empty(sum(lens), np.uint8)
    if len(buf):
        tl.copy_to_external(ctypes.c_void_p(buf.ctypes.data))
    data, out, start = buf.tobytes(), [], 0
    for n in lens:
        out.append(data[start:start + n])
        start += n
    return out


class SourceStream:
    """Sample-at-a-time view of one source's pipeline, with a resumable position.

    ``next()`` returns the next record (a dict ``{ext: np.ndarray or bytes}`` plus ``"__key__"``,
    shard:offset:name from DALI's source info, for error messages) as ``decode`` made it (a
    ``Sample`` or a ``Rejected``; ``decode`` is given a DALI batch of records). The pipeline
    runs here when the buffer is empty (DALI has run ahead already: ``prefetch`` batches in its
    own threads) and each sample's arrays are copied out of DALI's buffers: a batch of the caller
    may span two DALI runs, and the second run may reuse the first one's buffers.
    """

    def __init__(self, plan: SourcePlan, *, rank: int, world: int, state: dict | None = None,
                 decode=None, **pipe_kw):
        self.plan, self.rank, self.world, self.pipe_kw = plan, rank, world, pipe_kw
        self.decode = decode  # a DALI batch's records -> Sample | Rejected each (None: records)
        total = plan.num_samples
        # DALI's contiguous split of the sample list; the epoch count is by this rank's part.
        self.part_size = max(1, total * (rank + 1) // world - total * rank // world)
        self.files = ShardFiles(dict(zip(map(str, plan.shards), plan.indices)))
        self.pending: deque = deque()
        self.ckpt_before: str | None = None
        self.consumed = 0
        self.samples_read = 0
        if state is not None:
            self.ckpt_before = state["checkpoint"]
            self.samples_read = state["samples_read"]
        self.pipe = build_pipeline(plan, rank=rank, world=world, checkpoint=self.ckpt_before,
                                   **pipe_kw)
        if state is not None and state["consumed"]:
            self._refill()
            for _ in range(state["consumed"]):
                self.pending.popleft()
            self.consumed = state["consumed"]

    def _refill(self) -> None:
        """The next DALI batch into ``pending``, decoded (its samples own their arrays)."""
        ckpt, records = self._run_and_parse()
        self.ckpt_before = ckpt
        self.pending.extend(records if self.decode is None else self.decode(records))
        self.consumed = 0

    def _run_and_parse(self) -> tuple[str, list[dict]]:
        """(the checkpoint before the run, the batch's records): one ``pipe.run()`` and
        the host-side parse of its outputs (the only caller of the pipeline and ``files``)."""
        ckpt = self.pipe.checkpoint()
        try:
            outs = self.pipe.run()
        except Exception as e:  # DALI errors name the file; add which source we were reading
            culprit = self._find_undecodable(ckpt) if "jpg" in self.plan.exts else None
            if culprit:  # decoding runs inside DALI: a sample cannot be skipped there
                raise BadSampleError(f"{culprit}; DALI stopped decoding its batch (run "
                                     f"'imagebert-ds validate {self.plan.path} --clean-out DIR' "
                                     f"and train on DIR)") from e
            raise RuntimeError(f"{self.plan.path}: DALI pipeline failed: {e}") from e
        cpu = [o.as_cpu() if hasattr(o, "as_cpu") else o for o in outs]
        exts, direct = self.plan.dali_exts, self.plan.direct
        # column by column: one pass per component, the .npy headers parsed once per run
        bad: dict[int, str] = {}
        cols = []
        for j, (ext, tl) in enumerate(zip(exts, cpu)):
            if j == 0:
                keys = [t.source_info() for t in tl]  # "shard.tar:offset:KEY.ext"
            if ext.endswith(".npy") and tl.is_dense_tensor():  # same-size buffers: one copy
                cols.append(npy_column(tl.as_array(), f".{ext}", bad))
                continue
            if ext in ("txt", "json"):
                cols.append(_bytes_column(tl))
                continue
            arrays = [np.asarray(t) for t in tl]
            if ext.endswith(".npy"):  # parsed here: views of the reader's buffer, copied
                cols.append([v.copy() for v in npy_views(arrays, f".{ext}", bad)])
            else:  # copied: the next run may reuse DALI's buffers while the caller holds them
                cols.append([a.copy() for a in arrays])
        where = [split_sample_key(k) for k in keys] if direct else []
        for ext in direct:  # headers read now, payloads by the collator
            cols.append(self.files.npy_refs(where, ext))
        names = exts + list(direct)
        samples = []
        for i, values in enumerate(zip(*cols)):
            sample = dict(zip(names, values))
            sample["__key__"] = keys[i]
            if i in bad:
                sample[READ_ERROR] = bad[i]
            if direct:
                for ext in direct:
                    ref = sample[ext]
                    if isinstance(ref, ValueError):
                        sample[ext] = None
                        sample.setdefault(READ_ERROR, str(ref))
                if any(sample[ext] is None for ext in direct) and READ_ERROR not in sample:
                    continue  # incomplete (policy skip, counted by plan_source): DALI would drop it
            samples.append(sample)
        return ckpt, samples

    def close(self) -> None:
        """Release the pipeline."""
        self.pipe = None

    def _find_undecodable(self, ckpt: str | None) -> str | None:
        """After a failed run: re-read the same DALI batch without decoding (from ``ckpt``, the
        checkpoint taken before it) and name the first ``.jpg`` that PIL cannot decode:
        ``shard: sample 'key': problem``. None when that does not find one."""
        from imagebert_ds.data.validate import check_image

        try:
            names = [op.name for op in self.pipe._ops if op.name != "reader"]
            raw = build_pipeline(self.plan, rank=self.rank, world=self.world,
                                 checkpoint=ckpt, raw_jpg_as=names, **self.pipe_kw)
            cpu = [o.as_cpu() if hasattr(o, "as_cpu") else o for o in raw.run()]
        except Exception:  # noqa: BLE001 - diagnosis only; the original error is raised
            return None
        jpg = cpu[self.plan.dali_exts.index("jpg")]
        for i in range(len(jpg)):
            problem = check_image(np.asarray(jpg[i]).tobytes())
            if problem:
                shard, key = split_sample_key(jpg[i].source_info())
                return f"{shard}: sample '{key}': {problem}"
        return None

    def next(self):
        """The next record of this rank's stream, decoded (runs the pipeline when the buffer is
        empty)."""
        while not self.pending:  # (a DALI batch of only incomplete samples leaves none)
            self._refill()
        self.consumed += 1
        self.samples_read += 1
        return self.pending.popleft()

    @property
    def epoch(self) -> float:
        """Fractional epochs through this rank's part of the source."""
        return self.samples_read / self.part_size

    def state_dict(self) -> dict:
        """Where to resume: the DALI checkpoint before the current batch, samples used from it."""
        return {"checkpoint": self.ckpt_before, "consumed": self.consumed,
                "samples_read": self.samples_read}
