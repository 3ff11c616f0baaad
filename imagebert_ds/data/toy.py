"""``make-toy-data``: a deterministic, learnable synthetic image-text dataset.

Each scene is a small image (64x64 JPEG) with 1-3 coloured shapes, each in its own cell of a 3x3
grid. Captions describe colour, shape and position ("a red circle on the left and a blue square at
the bottom right"). Region data is derived from the shapes, one region per shape, like a perfect
but noisy detector:

* ``.roi.npy`` (R, 2048) float16 = ``concat(onehot(colour, 6), onehot(shape, 4)) @ P + N(0, 0.1)``
  where ``P`` (10, 2048) is a fixed random projection (seed ``PROJ_SEED``, the same for every
  split and every ``--seed``);
* ``.box.npy`` (R, 4) float32 = the shape's pixel bbox (x1, y1, x2, y2), jittered by <= 1 px;
* ``.cls.npy`` (R,) int64 = the (colour, shape) class ``colour * 4 + shape`` (24 classes).

Splits (``DIR/<split>/shard-NNNNNN.tar`` + ``.idx``, ``shard_size`` = 1000 samples per shard):

* ``test/`` -- ``--test`` scenes (default 100), 5 captions each (one per line of ``.txt``, different
  templates and object orders), no two with the same content, nor one's objects a subset of
  another's;
* ``stage1_web/`` -- ``--train`` scenes (default 4000), one caption each, 20% noisy (half a wrong
  colour for one object, half the caption of an unrelated scene): the "web data" stage;
* ``stage2_clean/`` -- ``--train // 2`` scenes, one clean caption each: the "CC+SBU" stage.

Training scenes never have the content of a test scene. The same ``--seed`` gives identical bytes.

Labelled image-text relation splits (``--relation-train N --relation-test M``; none by default,
and the splits above do not change with them): ``relation_train/`` and ``relation_test/``, one
caption per scene, whose ``.json`` holds ``flag_t`` (every object the caption names is in the
scene), ``flag_v`` (the scene holds an object the caption does not name) and ``label`` =
``flag_tv = 2 * flag_t + flag_v`` (the relation framework's 4 classes), balanced (sample ``i``
has class ``i % 4``):

* 3 (t=1, v=1): the caption names a strict subset of the scene's 2-3 objects;
* 2 (t=1, v=0): the caption names exactly the scene's objects;
* 1 (t=0, v=1): the caption describes another scene that shares no object with this one;
* 0 (t=0, v=0): the caption names every object of the scene plus 1-2 that are not in it.

Captions use the training templates and random object orders; no relation scene has the
content of a test scene.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from imagebert_ds.data.shards.format import shard_name
from imagebert_ds.data.shards.writer import ShardWriter

log = logging.getLogger(__name__)

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
           "yellow": (235, 215, 30), "purple": (140, 40, 170), "orange": (245, 140, 20)}
COLOUR_NAMES = list(COLOURS)
SHAPES = ["circle", "square", "triangle", "diamond"]
# 3x3 grid cells, row-major; phrase used in captions.
CELL_PHRASES = ["at the top left", "at the top", "at the top right",
                "on the left", "in the center", "on the right",
                "at the bottom left", "at the bottom", "at the bottom right"]
NUM_CLASSES = len(COLOURS) * len(SHAPES)  # cls id = colour * 4 + shape
IMAGE_SIZE = 64
FEAT_DIM = 2048
PROJ_SEED = 1234
FEAT_NOISE = 0.1
SHARD_SIZE = 1000
SPLIT_CODES = {"test": 0, "stage1_web": 1, "stage2_clean": 2, "relation_train": 3,
               "relation_test": 4}
ID_OFFSET = {"test": 0, "stage1_web": 1_000_000, "stage2_clean": 2_000_000,
             "relation_train": 3_000_000, "relation_test": 4_000_000}
RELATION_CLASSES = 4  # flag_tv = 2 * flag_t + flag_v

Scene = tuple  # ((cell, colour, shape), ...) sorted by cell: the canonical caption content


def projection() -> np.ndarray:
    """The fixed (10, 2048) projection from one-hot(colour) ⊕ one-hot(shape) to features."""
    rng = np.random.default_rng(PROJ_SEED)
    return rng.standard_normal((len(COLOURS) + len(SHAPES), FEAT_DIM)).astype(np.float32)


def random_scene(rng: np.random.Generator) -> Scene:
    """1-3 objects ``(cell, colour, shape)`` in distinct grid cells, sorted by cell."""
    k = int(rng.integers(1, 4))
    cells = rng.choice(9, size=k, replace=False)
    return tuple(sorted((int(c), int(rng.integers(len(COLOURS))), int(rng.integers(len(SHAPES))))
                        for c in cells))


def make_scenes(n: int, rng: np.random.Generator, exclude: set, unique: bool) -> list[Scene]:
    """``n`` scenes whose content is not in ``exclude``.

    ``unique`` (the test split): all different, and no scene's objects a subset of another's, so
    every test caption describes exactly one test image -- even for a model that only checks
    that the described objects are present.
    """
    scenes: list[Scene] = []
    sets: list[frozenset] = []
    while len(scenes) < n:
        s = random_scene(rng)
        if s in exclude:
            continue
        if unique:
            fs = frozenset(s)
            if any(fs <= t or t <= fs for t in sets):
                continue
            sets.append(fs)
        scenes.append(s)
    return scenes


def _phrase(obj, template: int) -> str:
    cell, c, s = obj
    colour, shape, where = COLOUR_NAMES[c], SHAPES[s], CELL_PHRASES[cell]
    if template % 3 == 0:
        return f"a {colour} {shape} {where}"
    if template % 3 == 1:
        return f"{where} a {colour} {shape}"
    return f"a {shape} in {colour} {where}"


def caption(scene: Scene, template: int, order: list[int]) -> str:
    """One caption of ``scene``; ``template`` picks wording, ``order`` the object order."""
    parts = [_phrase(scene[i], template) for i in order]
    body = " and ".join(parts)
    prefix = ["", "there is ", "a picture of ", "an image with ", "we see "][template % 5]
    return prefix + body


def render(scene: Scene, rng: np.random.Generator):
    """Draw the scene; returns (jpeg bytes, boxes (R, 4) float32 pixel x1,y1,x2,y2)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    cell = IMAGE_SIZE / 3
    boxes = []
    for cell_id, c, s in scene:
        row, col = divmod(cell_id, 3)
        size = float(rng.uniform(0.55, 0.85)) * cell
        cx = (col + 0.5) * cell + float(rng.uniform(-1.5, 1.5))
        cy = (row + 0.5) * cell + float(rng.uniform(-1.5, 1.5))
        x1, y1, x2, y2 = cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2
        fill = COLOURS[COLOUR_NAMES[c]]
        if SHAPES[s] == "circle":
            draw.ellipse([x1, y1, x2, y2], fill=fill)
        elif SHAPES[s] == "square":
            draw.rectangle([x1, y1, x2, y2], fill=fill)
        elif SHAPES[s] == "triangle":
            draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill)
        boxes.append([x1, y1, x2, y2])
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    box = np.asarray(boxes, np.float32) + rng.uniform(-1, 1, (len(boxes), 4)).astype(np.float32)
    box = np.clip(box, 0, IMAGE_SIZE)
    return buf.getvalue(), box


def region_arrays(scene: Scene, proj: np.ndarray, rng: np.random.Generator):
    """(R, 2048) float16 features and (R,) int64 class ids for the scene's shapes."""
    onehot = np.zeros((len(scene), len(COLOURS) + len(SHAPES)), np.float32)
    for i, (_, c, s) in enumerate(scene):
        onehot[i, c] = 1.0
        onehot[i, len(COLOURS) + s] = 1.0
    feats = onehot @ proj + FEAT_NOISE * rng.standard_normal((len(scene), FEAT_DIM), np.float32)
    cls = np.asarray([c * len(SHAPES) + s for _, c, s in scene], np.int64)
    return feats.astype(np.float16), cls


def _train_caption(scene: Scene, all_scenes: list[Scene], noisy: bool,
                   rng: np.random.Generator) -> tuple[str, str]:
    """A training caption and its kind: 'clean', 'wrong_colour' or 'unrelated'."""
    template = int(rng.integers(15))
    order = [int(i) for i in rng.permutation(len(scene))]
    if not noisy:
        return caption(scene, template, order), "clean"
    if rng.random() < 0.5:
        i = int(rng.integers(len(scene)))
        cell, c, s = scene[i]
        c2 = (c + 1 + int(rng.integers(len(COLOURS) - 1))) % len(COLOURS)
        wrong = tuple((cell, c2, s) if j == i else o for j, o in enumerate(scene))
        return caption(wrong, template, order), "wrong_colour"
    other = all_scenes[int(rng.integers(len(all_scenes)))]
    return caption(other, template, list(range(len(other)))), "unrelated"


def _write_split(out: Path, split: str, scenes: list[Scene], seed: int, noise_frac: float,
                 n_captions: int, proj: np.ndarray, shard_size: int) -> int:
    """Write one split's shards; finished shards are skipped. Returns shards written now."""
    from tqdm import tqdm

    written = 0
    n_shards = (len(scenes) + shard_size - 1) // shard_size
    for sh in tqdm(range(n_shards), desc=f"toy {split}", unit="shard", leave=False):
        path = out / split / shard_name(sh)
        if path.exists():
            continue  # finished by an earlier run (ShardWriter renames only when complete)
        rng = np.random.default_rng([seed, SPLIT_CODES[split], sh])
        with ShardWriter(path) as w:
            for i in range(sh * shard_size, min(len(scenes), (sh + 1) * shard_size)):
                scene = scenes[i]
                image_id = ID_OFFSET[split] + i
                jpg, box = render(scene, rng)
                feats, cls = region_arrays(scene, proj, rng)
                if n_captions > 1:  # eval: distinct templates, rotated object orders
                    caps = [caption(scene, t, list(np.roll(np.arange(len(scene)), t)))
                            for t in range(n_captions)]
                    kind = "clean"
                else:
                    cap, kind = _train_caption(scene, scenes, rng.random() < noise_frac, rng)
                    caps = [cap]
                meta = {"image_id": image_id, "caption_id": image_id * 10, "source": f"toy/{split}",
                        "width": IMAGE_SIZE, "height": IMAGE_SIZE, "caption_kind": kind,
                        "num_captions": len(caps)}
                w.write(f"{image_id:09d}", {"jpg": jpg, "txt": "\n".join(caps), "json": meta,
                                            "roi.npy": feats, "box.npy": box, "cls.npy": cls})
        written += 1
    return written


def _random_objects(rng: np.random.Generator, n: int, free_cells: list[int]) -> list[tuple]:
    """``n`` random objects in distinct cells drawn from ``free_cells``."""
    cells = rng.choice(free_cells, size=n, replace=False)
    return [(int(c), int(rng.integers(len(COLOURS))), int(rng.integers(len(SHAPES))))
            for c in cells]


def relation_pair(cls: int, rng: np.random.Generator) -> tuple[Scene, Scene]:
    """(scene, described content) of relation class ``cls`` = 2 * flag_t + flag_v."""
    if cls == 3:    # t=1, v=1: a strict subset of a 2-3 object scene
        scene = tuple(sorted(_random_objects(rng, int(rng.integers(2, 4)), list(range(9)))))
        keep = rng.choice(len(scene), size=int(rng.integers(1, len(scene))), replace=False)
        return scene, tuple(scene[i] for i in sorted(keep))
    if cls == 2:    # t=1, v=0: exactly the scene
        scene = random_scene(rng)
        return scene, scene
    if cls == 1:    # t=0, v=1: another scene, no object in common
        scene = random_scene(rng)
        while True:
            other = random_scene(rng)
            if not set(other) & set(scene):
                return scene, other
    # cls 0, t=0, v=0: the scene's 1-2 objects plus 1-2 that are not there
    scene = tuple(sorted(_random_objects(rng, int(rng.integers(1, 3)), list(range(9)))))
    free = [c for c in range(9) if c not in {o[0] for o in scene}]
    extra = _random_objects(rng, int(rng.integers(1, 4 - len(scene))), free)
    return scene, tuple(sorted(list(scene) + extra))


def _write_relation_split(out: Path, split: str, n: int, seed: int, exclude: set,
                          proj: np.ndarray, shard_size: int) -> int:
    """One labelled relation split (module docstring); finished shards are skipped."""
    written = 0
    for sh in range((n + shard_size - 1) // shard_size):
        path = out / split / shard_name(sh)
        if path.exists():
            continue
        rng = np.random.default_rng([seed, SPLIT_CODES[split], sh])
        with ShardWriter(path) as w:
            for i in range(sh * shard_size, min(n, (sh + 1) * shard_size)):
                cls = i % RELATION_CLASSES
                scene, described = relation_pair(cls, rng)
                while scene in exclude:
                    scene, described = relation_pair(cls, rng)
                jpg, box = render(scene, rng)
                feats, ids = region_arrays(scene, proj, rng)
                cap = caption(described, int(rng.integers(15)),
                              [int(j) for j in rng.permutation(len(described))])
                image_id = ID_OFFSET[split] + i
                meta = {"image_id": image_id, "caption_id": image_id * 10, "source": f"toy/{split}",
                        "width": IMAGE_SIZE, "height": IMAGE_SIZE, "caption_kind": "relation",
                        "num_captions": 1, "flag_t": cls >> 1, "flag_v": cls & 1, "label": cls}
                w.write(f"{image_id:09d}", {"jpg": jpg, "txt": cap, "json": meta,
                                            "roi.npy": feats, "box.npy": box, "cls.npy": ids})
        written += 1
    return written


def make_toy_data(out: str | Path, train: int = 4000, test: int = 100, seed: int = 0,
                  noise_frac: float = 0.2, shard_size: int = SHARD_SIZE,
                  relation_train: int = 0, relation_test: int = 0) -> dict[str, int]:
    """Generate the toy dataset under ``out``; returns {split: number of samples}.

    ``relation_train`` / ``relation_test`` > 0 add the labelled relation splits."""
    out = Path(out)
    proj = projection()
    test_scenes = make_scenes(test, np.random.default_rng([seed, 100]), set(), unique=True)
    excl = set(test_scenes)
    stage1 = make_scenes(train, np.random.default_rng([seed, 101]), excl, unique=False)
    stage2 = make_scenes(max(1, train // 2), np.random.default_rng([seed, 102]), excl, unique=False)
    sizes = {}
    for split, scenes, noise, ncap in (("test", test_scenes, 0.0, 5),
                                       ("stage1_web", stage1, noise_frac, 1),
                                       ("stage2_clean", stage2, 0.0, 1)):
        n = _write_split(out, split, scenes, seed, noise, ncap, proj, shard_size)
        log.info("toy %s: %d samples (%d shards written now)", split, len(scenes), n)
        sizes[split] = len(scenes)
    for split, n in (("relation_train", relation_train), ("relation_test", relation_test)):
        if n > 0:
            k = _write_relation_split(out, split, n, seed, excl, proj, shard_size)
            log.info("toy %s: %d labelled samples (%d shards written now)", split, n, k)
            sizes[split] = n
    return sizes
