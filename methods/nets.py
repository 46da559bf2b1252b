"""The networks of every method: the core's (`kip.nets`) and the variants a method's paper
defines, by name (`NETS`, `make_net`), for the commands, the methods and the kernels on them.

- `frepo_convnet`: FRePo's ConvNet (Zhou et al., NeurIPS 2022, official code): widths w, 2w, 4w;
  the norm before every conv but the first; one-channel 28x28 images padded by 3 in the first
  conv (28 -> 32 -> 16 -> 8 -> 4).
- `krr_st_convnet`: KRR-ST's ConvNet (Lee et al., ICLR 2024, official code): conv -> norm -> ReLU
  -> avg-pool, widths w, 2w, 4w; 28x28 images padded by 3 in the first conv as FRePo's.

Both are `kip.nets.ConvNet`s; a new method's net is one more entry of `METHOD_NETS`.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn

from kip import nets as core
from kip.nets import ConvNet

__all__ = ["METHOD_NETS", "NETS", "make_net"]


def _first_padding(image_shape: tuple[int, ...] | None) -> int | None:
  # 28x28 images padded by 3 so the blocks see 32x32, as for CIFAR.
  return 3 if image_shape is not None and image_shape[:2] == (28, 28) else None


def frepo_convnet(num_classes: int, *, width: int, norm: str, parameterization: str,
                  image_shape: tuple[int, ...] | None, **_) -> nn.Module:
  """FRePo's ConvNet (see the module docstring)."""
  return ConvNet(num_classes, width=width, extra_conv=False, norm=norm,
                 parameterization=parameterization, first_padding=_first_padding(image_shape),
                 width_growth=2, norm_first=True)


def krr_st_convnet(num_classes: int, *, width: int, norm: str, parameterization: str,
                   image_shape: tuple[int, ...] | None, **_) -> nn.Module:
  """KRR-ST's ConvNet (see the module docstring)."""
  return ConvNet(num_classes, width=width, extra_conv=False, norm=norm,
                 parameterization=parameterization, first_padding=_first_padding(image_shape),
                 width_growth=2)


# name -> builder(num_classes, *, width, norm, parameterization, image_shape, dc_padding, depth)
METHOD_NETS: dict[str, Callable[..., nn.Module]] = {
    "frepo_convnet": frepo_convnet,
    "krr_st_convnet": krr_st_convnet,
}
NETS = tuple(sorted((*core.NETS, *METHOD_NETS)))


def make_net(name: str, num_classes: int, *, width: int, norm: str = "none",
             parameterization: str = "standard", image_shape: tuple[int, int, int] | None = None,
             dc_padding: bool = False, depth: int = 3) -> nn.Module:
  """The network `name` (one of `NETS`): a method's variant, or `kip.nets.make_net`'s (see there
  for the arguments). An unknown name is a ValueError naming the choices."""
  core.check_net_options(norm, parameterization)
  if name not in METHOD_NETS:
    if name not in core.NETS:
      raise ValueError(f"unknown net {name!r}; choose one of {', '.join(NETS)}")
    return core.make_net(name, num_classes, width=width, norm=norm,
                         parameterization=parameterization, image_shape=image_shape,
                         dc_padding=dc_padding, depth=depth)
  return METHOD_NETS[name](num_classes, width=width, norm=norm, parameterization=parameterization,
                           image_shape=image_shape, dc_padding=dc_padding, depth=depth)
