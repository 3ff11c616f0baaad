"""The retrieval protocols of the papers' tables (Karpathy test splits; ``PAPERS.md``).

* ``flickr30k-1k``: the 1,000 Flickr30k test images, 5 captions each.
* ``coco-5k``: the 5,000 COCO test images, 5 captions each.
* ``coco-1k``: the same 5K split in five folds of 1,000 consecutive images; each fold is ranked on
  its own and the reported recalls are the means over the folds (UNITER/ALBEF's "1K test").
* ``none``: the split as it is (any size, any number of captions per image).

A protocol keeps the first 5 captions of each image (a few COCO images have 6 or 7, the papers
count 25,000 captions) and refuses a split of the wrong size, naming what it found.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from imagebert_ds.eval.retrieval import image_range


@dataclass(frozen=True)
class Protocol:
    """A named test protocol: split size, captions kept per image, folds, default re-rank k."""
    name: str
    num_images: int | None  # None: any
    captions_per_image: int | None  # kept per image; None: all
    folds: int  # consecutive equal folds ranked separately, recalls averaged
    default_k: int  # two-stage candidates per query (ALBEF: 128 Flickr30k, 256 COCO)


PROTOCOLS = {
    "flickr30k-1k": Protocol("flickr30k-1k", 1000, 5, 1, 128),
    "coco-5k": Protocol("coco-5k", 5000, 5, 1, 256),
    "coco-1k": Protocol("coco-1k", 5000, 5, 5, 256),
    "none": Protocol("none", None, None, 1, 128),
}


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; an unknown name lists the known ones."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{name}' (known: {', '.join(PROTOCOLS)})")
    return PROTOCOLS[name]


def keep_captions(split, n: int):
    """The split with only the first ``n`` captions of each image (in caption order)."""
    import dataclasses

    t2i = split.text_to_image
    seen = [0] * split.num_images
    flags = []
    for i in t2i.tolist():
        flags.append(seen[i] < n)
        seen[i] += 1
    if all(flags):
        return split
    keep = torch.tensor(flags, dtype=torch.bool)
    return dataclasses.replace(
        split, input_ids=split.input_ids[keep], attention_mask=split.attention_mask[keep],
        text_to_image=t2i[keep], captions=[c for c, k in zip(split.captions, keep.tolist()) if k])


def protocol_folds(split, protocol: Protocol, where: str = "the split") -> list:
    """The sub-splits ``protocol`` ranks (one, or COCO 1K's five), after checking the size."""
    if protocol.num_images is not None and split.num_images != protocol.num_images:
        raise ValueError(f"protocol {protocol.name} needs {protocol.num_images} test images, "
                         f"{where} has {split.num_images} ({split.num_texts} captions): use the "
                         f"Karpathy test split or --protocol none")
    if protocol.captions_per_image is not None:
        counts = torch.bincount(split.text_to_image, minlength=split.num_images)
        short = (counts < protocol.captions_per_image).nonzero().flatten()
        if len(short):
            i = int(short[0])
            raise ValueError(f"protocol {protocol.name} needs {protocol.captions_per_image} "
                             f"captions per image, {where}: image_id {int(split.image_ids[i])} has "
                             f"{int(counts[i])} ({len(short)} image(s) short)")
        split = keep_captions(split, protocol.captions_per_image)
    if protocol.folds == 1:
        return [split]
    size = split.num_images // protocol.folds
    return [image_range(split, f * size, (f + 1) * size) for f in range(protocol.folds)]
