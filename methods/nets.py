"""The networks of every method: the core's (`kip.nets`) and the variants a method's paper
defines, by name (`NETS`, `make_net`), for the commands, the methods and the kernels on them.

- `frepo_convnet`: FRePo's ConvNet (Zhou et al., NeurIPS 2022, official code): widths w, 2w, 4w;
  the norm before every conv but the first; one-channel 28x28 images padded by 3 in the first
  conv (28 -> 32 -> 16 -> 8 -> 4); batch norm's running averages with the official flax
  momentum 0.1 (`0.1 old + 0.9 batch`: a young pool model's inference-mode features use almost
  its latest batch's statistics).
- `krr_st_convnet`: KRR-ST's ConvNet (Lee et al., ICLR 2024, official code): conv -> norm -> ReLU
  -> avg-pool, widths w, 2w, 4w; 28x28 images padded by 3 in the first conv as FRePo's.

Both are `kip.nets.ConvNet`s; a new method's net is one more entry of `METHOD_NETS`.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn

from kip import nets as core
from kip.nets import ConvNet

__all__ = ["FREPO_BN_MOMENTUM", "METHOD_NETS", "NETS", "make_net"]


def _first_padding(image_shape: tuple[int, ...] | None) -> int | None:
  # 28x28 images padded by 3 so the blocks see 32x32, as for CIFAR.
  return 3 if image_shape is not None and image_shape[:2] == (28, 28) else None


FREPO_BN_MOMENTUM = 0.1


def frepo_convnet(num_classes: int, *, width: int, norm: str, parameterization: str,
                  image_shape: tuple[int, ...] | None, bn_momentum: float | None = None,
                  **_) -> nn.Module:
  """FRePo's ConvNet (see the module docstring); `bn_momentum` None: the official 0.1."""
  return ConvNet(num_classes, width=width, extra_conv=False, norm=norm,
                 parameterization=parameterization, first_padding=_first_padding(image_shape),
                 width_growth=2, norm_first=True,
                 bn_momentum=FREPO_BN_MOMENTUM if bn_momentum is None else bn_momentum)


def krr_st_convnet(num_classes: int, *, width: int, norm: str, parameterization: str,
                   image_shape: tuple[int, ...] | None, **_) -> nn.Module:
  """KRR-ST's ConvNet (see the module docstring)."""
  return ConvNet(num_classes, width=width, extra_conv=False, norm=norm,
                 parameterization=parameterization, first_padding=_first_padding(image_shape),
                 width_growth=2)


# name -> builder(num_classes, *, width, norm, parameterization, image_shape, dc_padding, depth,
#                 bn_momentum)
METHOD_NETS: dict[str, Callable[..., nn.Module]] = {
    "frepo_convnet": frepo_convnet,
    "krr_st_convnet": krr_st_convnet,
}
NETS = tuple(sorted((*core.NETS, *METHOD_NETS)))


def make_net(name: str, num_classes: int, *, width: int, norm: str = "none",
             parameterization: str = "standard", image_shape: tuple[int, int, int] | None = None,
             dc_padding: bool = False, depth: int | None = None,
             bn_momentum: float | None = None) -> nn.Module:
  """The network `name` (one of `NETS`): a method's variant, or `kip.nets.make_net`'s (see there
  for the arguments). `bn_momentum` (a method net's batch-norm running-average weight; None: the
  net's own) is refused for the core nets. An unknown name is a ValueError naming the choices."""
  core.check_net_options(norm, parameterization)
  if name not in METHOD_NETS:
    if name not in core.NETS:
      raise ValueError(f"unknown net {name!r}; choose one of {', '.join(NETS)}")
    if bn_momentum is not None:
      raise ValueError(f"net {name!r} has no bn_momentum option")
    return core.make_net(name, num_classes, width=width, norm=norm,
                         parameterization=parameterization, image_shape=image_shape,
                         dc_padding=dc_padding, depth=depth)
  return METHOD_NETS[name](num_classes, width=width, norm=norm, parameterization=parameterization,
                           image_shape=image_shape, dc_padding=dc_padding,
                           depth=3 if depth is None else depth, bn_momentum=bn_momentum)
