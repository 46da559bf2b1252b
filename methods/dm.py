"""DM, distribution matching (Zhao & Bilen, WACV 2023): DataDAM's embedding term alone.

Each step a fresh ConvNet-3 (instance norm, frozen); per class, the squared distance between the
mean embedding of a real batch and of the class's synthetic images after the same DSA draw, summed
over classes; images by SGD (lr 1, momentum 0.5). No attention term: `make_matching` with
`attention_weight=0` (methods/datadam.py).
"""

from __future__ import annotations

from kip.method import Method
from methods.datadam import make_matching

__all__ = ["make_dm"]


def make_dm(*, num_classes: int, image_shape: tuple[int, int, int], norm: str = "instance",
            real_per_class: int = 256, **kwargs) -> Method:
  """DM as a `kip.method.Method`; other arguments: `methods.datadam.make_matching`'s."""
  return make_matching(num_classes=num_classes, image_shape=image_shape, norm=norm,
                       attention_weight=0.0, embedding_weight=1.0,
                       real_per_class=real_per_class, **kwargs)
