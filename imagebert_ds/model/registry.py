"""The model configs shipped inside the package (``imagebert_ds/model/configs/*.yaml``), by name
(open_clip's ``list_models``): ``tiny``, ``base``, ``large``, ``pixelbert_tiny``, ``pixelbert_r50``.
"""
from __future__ import annotations

import logging
from pathlib import Path

from imagebert_ds.config_utils import ConfigError

CONFIG_DIR = Path(__file__).with_name("configs")
log = logging.getLogger(__name__)


def list_models() -> list[str]:
    """Names of the shipped model configs."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_model_config(name_or_path: str) -> Path:
    """The YAML file that ``model.config`` names: a shipped config's name, or a file path.

    A path of the former ``configs/model/NAME.yaml`` form that does not exist is read as the
    shipped config ``NAME``, with a warning naming the new spelling."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    if p.suffix == "" and (CONFIG_DIR / f"{name_or_path}.yaml").is_file():
        return CONFIG_DIR / f"{name_or_path}.yaml"
    if p.parent.name == "model" and (CONFIG_DIR / p.name).is_file():
        log.warning("model.config %s: read as the shipped model config '%s' (write "
                    "model.config: %s)", name_or_path, p.stem, p.stem)
        return CONFIG_DIR / p.name
    raise ConfigError(f"model config {name_or_path}: neither a file nor a shipped model "
                      f"({', '.join(list_models())})")
