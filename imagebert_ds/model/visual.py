"""Visual tokens from pixels: Pixel-BERT's CNN feature map (``pixel``) or ViLT patches (``patch``),
with random pixel sampling in training (Huang et al. 2020, PAPERS.md).

``VisualEmbeddings``: (B, 3, H, W) normalized pixels -> (B, V, H) tokens (feature + semantic +
region segment + learned row/col position) and a (B, V) bool mask, False = padding (all-zero
cells). Design notes: docs/training.md, "Pixel-BERT". Not built in ``region`` mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ImageBERTConfig

#: output channels of a torchvision ResNet trunk after stage 1..4
BACKBONE_CHANNELS = {"resnet18": (64, 128, 256, 512), "resnet34": (64, 128, 256, 512),
                     "resnet50": (256, 512, 1024, 2048), "resnet101": (256, 512, 1024, 2048)}


def build_backbone(name: str, stages: int, weights: Optional[str] = None) -> tuple[nn.Module, int]:
    """A torchvision ResNet truncated after ``stages`` stages -> (module, output channels)."""
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        missing, unexpected = net.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith("fc.")]
        if bad or unexpected:
            raise ValueError(f"{weights}: not a torchvision {name} state_dict (missing "
                             f"{bad[:3]}, unexpected {list(unexpected)[:3]})")
    layers = [net.conv1, net.bn1, net.relu, net.maxpool,
              net.layer1, net.layer2, net.layer3, net.layer4][:4 + stages]
    return nn.Sequential(*layers), BACKBONE_CHANNELS[name][stages - 1]


@dataclass
class VisualFeatures:
    """A batch's projected feature map and which of its cells show the image (not padding);
    rows index like a tensor (``vf[idx]``), so passes over the same images can share it."""
    map: torch.Tensor   # (B, h, w, H)
    real: torch.Tensor  # (B, h, w) bool

    def __getitem__(self, idx) -> "VisualFeatures":
        return VisualFeatures(self.map[idx], self.real[idx])

    def __len__(self) -> int:
        return self.map.shape[0]


def real_cells(pixel_values: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 3, S, S') normalized pixels -> (B, h, w) bool: the cell's footprint holds a pixel
    that is not padding (padding = 0 in every channel; module docstring)."""
    real = (pixel_values != 0).any(1, keepdim=True)                          # (B, 1, S, S')
    return F.adaptive_max_pool2d(real.to(torch.float32), (h, w))[:, 0] > 0


class VisualEmbeddings(nn.Module):
    """(B, 3, H, W) normalized pixels -> (B, V, H) visual token embeddings (before the shared
    embedding LayerNorm), sampled in training (module docstring)."""

    def __init__(self, c: ImageBERTConfig):
        super().__init__()
        v, H = c.visual, c.hidden_size
        self.mode, self.sample_pixels, self.max_grid = v.mode, v.sample_pixels, v.max_grid
        if v.mode == "pixel":
            self.backbone, ch = build_backbone(v.backbone, v.backbone_stages, v.backbone_weights)
            self.proj = nn.Linear(ch, H)
            self.proj_ln = nn.LayerNorm(H, eps=c.layer_norm_eps)
        else:
            self.patch = nn.Conv2d(3, H, v.patch_size, stride=v.patch_size)
        self.semantic = nn.Parameter(torch.zeros(H))
        self.row = nn.Embedding(v.max_grid, H)
        self.col = nn.Embedding(v.max_grid, H)

    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, h, w, H) projected features of every position."""
        if self.mode == "pixel":
            f = self.backbone(pixel_values).permute(0, 2, 3, 1)              # (B, h, w, C)
            return self.proj_ln(self.proj(f))
        dtype = self.patch.weight.dtype
        return self.patch(pixel_values.to(dtype)).permute(0, 2, 3, 1)        # (B, h, w, H)

    def features(self, pixel_values: torch.Tensor) -> VisualFeatures:
        """(B, 3, H, W) -> the feature map of every position and its padding mask."""
        f = self.feature_map(pixel_values)                                   # (B, h, w, H)
        return VisualFeatures(f, real_cells(pixel_values, f.shape[1], f.shape[2]))

    def num_tokens(self, h: int, w: int) -> int:
        """Visual tokens per image for an h x w feature map (after sampling in training)."""
        n = h * w
        return min(n, self.sample_pixels) if self.training and self.sample_pixels else n

    def forward(self, pixel_values: Optional[torch.Tensor], segment: torch.Tensor,
                features: Optional[VisualFeatures] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> ((B, V, H) tokens, (B, V) bool mask, False = padding): features +
        semantic + ``segment`` (H,) + row/col position, V = all positions, or ``sample_pixels``
        random ones per image in training (padding drawn last). ``features``:
        ``self.features(pixel_values)`` computed once by the caller and shared by several passes
        over the same images (``pixel_values`` is then not read)."""
        vf = self.features(pixel_values) if features is None else features
        f, real = vf.map, vf.real.reshape(vf.real.shape[0], -1)              # (B, h, w, H), (B, hw)
        B, h, w, H = f.shape
        if h > self.max_grid or w > self.max_grid:
            raise ValueError(f"feature map {h}x{w} exceeds visual.max_grid={self.max_grid}: raise "
                             f"it or feed smaller images")
        rows = torch.arange(h, device=f.device)
        cols = torch.arange(w, device=f.device)
        pos = self.row(rows)[:, None, :] + self.col(cols)[None, :, :]        # (h, w, H)
        x = (f + pos.to(f.dtype) + (self.semantic + segment).to(f.dtype)).reshape(B, h * w, H)
        n = self.num_tokens(h, w)
        if n < h * w:  # random pixel sampling: a fresh subset per image and step
            draw = torch.rand(B, h * w, device=f.device) + (~real).to(torch.float32)  # pad: >= 1
            keep = draw.argsort(dim=1)[:, :n]                                # (B, n)
            x = x.gather(1, keep[..., None].expand(B, n, H))
            real = real.gather(1, keep)
        return x, real
