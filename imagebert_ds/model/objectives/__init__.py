"""Pre-training objectives as plug-ins (``base.Objective``): the registry and config parsing.

``REGISTRY`` maps a name (the key used in ``objectives:`` of a model config or a run stage) to
its class. Adding an objective is one new file beside these plus one line here. ``ALIASES`` maps
another paper's name for a task we already have to ours: ``mcl`` (the image-text relation
framework's multimodal contrastive learning) is exactly ``itc`` and is parsed as it.
"""
from __future__ import annotations

from typing import Any

from imagebert_ds.config_utils import ConfigError, from_dict

from .base import EncoderPass, Objective, ObjectiveConfig
from .cluster import DeepMultimodalClustering
from .itc import ImageTextContrastive
from .itm import ImageTextMatching
from .mlm import MaskedLanguageModeling
from .moc import MaskedObjectClassification
from .mrfr import MaskedRegionFeatureRegression

REGISTRY: dict[str, type[Objective]] = {
    "mlm": MaskedLanguageModeling,
    "moc": MaskedObjectClassification,
    "mrfr": MaskedRegionFeatureRegression,
    "itm": ImageTextMatching,
    "itc": ImageTextContrastive,
    "cluster": DeepMultimodalClustering,
}

#: other names for registered objectives; ``mcl`` is the relation framework's multimodal
#: contrastive learning: InfoNCE between the image and text embeddings of each pair against the
#: other pairs of the batch gathered across ranks, which is what ``itc`` computes (its docstring)
ALIASES: dict[str, str] = {"mcl": "itc"}

#: ImageBERT's four pre-training tasks (§4.2): what a model config or a stage without an
#: ``objectives`` key runs.
DEFAULT_OBJECTIVES = ("mlm", "moc", "mrfr", "itm")


def parse_objectives(data: dict[str, Any] | None, where: str = "objectives") -> dict[str, ObjectiveConfig]:
    """``{name: weight | {weight: w, option: value, ...}}`` -> ``{name: <name's Config>}``.

    A bare number is the weight. Unknown names or options are errors naming ``where`` and the key;
    objectives of weight 0 are dropped (0 switches a task off). ``None`` gives the defaults. The
    result is in ``REGISTRY`` order.
    """
    if data is None:
        return {n: REGISTRY[n].Config() for n in DEFAULT_OBJECTIVES}
    out: dict[str, ObjectiveConfig] = {}
    for given, value in data.items():
        name = ALIASES.get(given, given)
        if name not in REGISTRY:
            known = ", ".join([*REGISTRY, *ALIASES])
            raise ConfigError(f"{where}: unknown objective '{given}' (known: {known})")
        if name != given and name in data:
            raise ConfigError(f"{where}: '{given}' is another name for '{name}'; give one of them")
        cls = REGISTRY[name].Config
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, cls):
            cfg = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            cfg = from_dict(cls, {"weight": float(value)}, source=where, prefix=f"{given}.")
        elif isinstance(value, dict):
            cfg = from_dict(cls, value, source=where, prefix=f"{given}.")
        else:
            raise ConfigError(f"{where}: '{given}' must be a weight or a mapping of options, got {value!r}")
        if cfg.weight > 0:
            out[name] = cfg
    if not out:
        raise ConfigError(f"{where}: no objective has a weight > 0")
    # registry order, whatever the YAML's: heads are built (and initialised) in a fixed order
    return {n: out[n] for n in REGISTRY if n in out}


__all__ = ["REGISTRY", "ALIASES", "DEFAULT_OBJECTIVES", "parse_objectives", "Objective", "ObjectiveConfig",
           "EncoderPass"]
