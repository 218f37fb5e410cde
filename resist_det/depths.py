"""ResNet depths: block kind and blocks per section (He et al. 2016), without importing torch.

Shared by the model builders (:mod:`resist_det.models`) and by the recipe check, which must
refuse an unsupported depth or sections too short for ``resist.min_blocks`` before any rank
starts (and so without the torch import of the models package).
"""

from __future__ import annotations

__all__ = ["PREACT_DEPTHS", "TORCHVISION_DEPTHS"]

#: depth -> (block kind, blocks per section) of the pre-activation ResNets.
PREACT_DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}

#: torchvision's ResNets (the detector's backbones): the same table without 200.
TORCHVISION_DEPTHS = {d: v for d, v in PREACT_DEPTHS.items() if d != 200}
