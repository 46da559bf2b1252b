"""Make neural-tangents 0.6.5 import and run on current JAX (0.10.x).

neural-tangents 0.6.5 (the latest release, 2023) imports names that JAX has since moved or removed.
Importing this module, before `neural_tangents`, puts each missing name back where neural-tangents
looks for it, pointing at the current JAX object that does the same job. Nothing that exists is
replaced, so the patches are no-ops on a JAX that still has the old names, and each is listed
below with the reason it is needed. Use `from kip._compat import nt, stax` everywhere instead of
importing neural-tangents directly.

One patch is for speed, not compatibility: on CPU, the covariance of a convolution with full
spatial covariances (the pooled ConvNet kernels) is computed by summing shifted slices instead of
neural-tangents' depthwise convolutions with a diagonal filter; same numbers, same layout, about
10x faster (see `_shifted_full_spatial_conv`). Every neural-tangents internal we touch is here.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import itertools
import math
import sys
import types

import jax
import jax.extend.core
import jax.interpreters.ad

__all__ = ["nt", "stax", "PATCHED"]

PATCHED: list[str] = []


def _provide(module: types.ModuleType, name: str, value: object) -> None:
  """Sets `module.name = value` unless the module already has that name."""
  try:
    getattr(module, name)
    return
  except AttributeError:
    pass
  setattr(module, name, value)
  PATCHED.append(f"{module.__name__}.{name}")


def _patch_jax() -> None:
  # JAX 0.6 moved the jaxpr data structures from `jax.core` to `jax.extend.core`; neural-tangents'
  # structured-derivative NTK (`_src/empirical.py`) imports them from `jax.core` at module level.
  for name in ("Jaxpr", "JaxprEqn", "Literal", "Var", "Primitive"):
    _provide(jax.core, name, getattr(jax.extend.core, name))

  # The structured-derivative rules table (`_src/utils/rules.py`) is keyed by primitives; JAX 0.7
  # dropped the public alias of `zeros_like_p`, which still lives in `jax._src.ad_util`.
  from jax._src import ad_util  # noqa: PLC0415

  _provide(jax.interpreters.ad, "zeros_like_p", ad_util.zeros_like_p)

  # `jax.util` (safe_map / safe_zip: map and zip that insist on equal lengths) was removed in 0.7.
  if "jax.util" not in sys.modules:
    try:
      importlib.import_module("jax.util")
    except ImportError:
      util = types.ModuleType("jax.util", "Stand-in for the removed jax.util (see kip._compat).")
      util.safe_map = _safe_map
      util.safe_zip = _safe_zip
      sys.modules["jax.util"] = util
      jax.util = util
      PATCHED.append("jax.util")


def _safe_map(f, *args):
  args = list(map(list, args))
  n = len(args[0])
  if any(len(a) != n for a in args[1:]):
    raise ValueError(f"length mismatch: {[len(a) for a in args]}")
  return list(map(f, *args))


def _safe_zip(*args):
  args = list(map(list, args))
  n = len(args[0])
  if any(len(a) != n for a in args[1:]):
    raise ValueError(f"length mismatch: {[len(a) for a in args]}")
  return list(zip(*args, strict=True))


class _DeferredModule(types.ModuleType):
  """Stands in for a module until one of its attributes is used, then imports the real one."""

  def __getattr__(self, attr: str):
    if attr.startswith("__"):
      raise AttributeError(attr)
    del sys.modules[self.__name__]
    real = importlib.import_module(self.__name__)
    parent, _, child = self.__name__.rpartition(".")
    setattr(sys.modules[parent], child, real)
    return getattr(real, attr)


def _defer_experimental() -> None:
  # `neural_tangents/__init__.py` eagerly imports `neural_tangents.experimental`, whose only content
  # (an NTK for TensorFlow models) imports TensorFlow, Keras and tf2jax: ~10 s of start-up and GPU
  # memory taken by TF, for a feature we do not use. A stand-in module keeps
  # `nt.experimental.empirical_ntk_fn_tf` working on demand without paying for it up front.
  name = "neural_tangents.experimental"
  if name not in sys.modules:
    sys.modules[name] = _DeferredModule(name)
    PATCHED.append(f"{name} (deferred)")


def _eigvalsh(a, *args, eigvals=None, **kwargs):
  import scipy.linalg  # noqa: PLC0415

  if eigvals is not None:
    kwargs["subset_by_index"] = eigvals
  return scipy.linalg.eigvalsh(a, *args, **kwargs)


def _patch_scipy() -> None:
  # `nt.predict.max_learning_rate` calls `scipy.linalg.eigvalsh(..., eigvals=(lo, hi))`; SciPy 1.14
  # removed that keyword for `subset_by_index`, which means the same. Only `predict.sp` is swapped,
  # for a namespace whose `linalg.eigvalsh` translates the keyword; SciPy itself is untouched.
  import inspect  # noqa: PLC0415

  import scipy.linalg  # noqa: PLC0415

  if "eigvals" in inspect.signature(scipy.linalg.eigvalsh).parameters:
    return
  predict = sys.modules["neural_tangents._src.predict"]
  predict.sp = types.SimpleNamespace(linalg=types.SimpleNamespace(eigvalsh=_eigvalsh))
  PATCHED.append("neural_tangents._src.predict.sp.linalg.eigvalsh (eigvals= keyword)")


_patch_jax()
_defer_experimental()
import neural_tangents as nt  # noqa: E402
from neural_tangents import stax  # noqa: E402

_patch_scipy()


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _shifted_sum(x, filter_shape, pads, batch_ndim):
  """out[..., i, i', j, j'] = sum over offsets (a, b) of zero-padded x[..., i+a, i'+a, j+b, j'+b].

  `pads[k] = (lo, hi)` pads both axes of spatial pair k. Its own adjoint, with mirrored padding, is
  the VJP: JAX's transpose of the slices would materialise f_h * f_w padded copies (15x slower).
  """
  padded = jax.numpy.pad(x, [(0, 0)] * batch_ndim + [p for p in pads for _ in (0, 1)])
  sizes = [padded.shape[batch_ndim + 2 * k] - f + 1 for k, f in enumerate(filter_shape)]
  out = None
  for offsets in itertools.product(*(range(f) for f in filter_shape)):
    index = [slice(None)] * batch_ndim
    for d, n in zip(offsets, sizes, strict=True):
      index += [slice(d, d + n)] * 2
    term = padded[tuple(index)]
    out = term if out is None else out + term
  return out


def _shifted_sum_fwd(x, filter_shape, pads, batch_ndim):
  return _shifted_sum(x, filter_shape, pads, batch_ndim), x.shape


def _shifted_sum_bwd(filter_shape, pads, batch_ndim, in_shape, g):
  # x_bar[j] = sum_d g[j - d + lo]: the same sum over g padded by (f - 1 - lo) before and by
  # whatever brings it back to the input's length after.
  mirrored = []
  for k, ((lo, _), f) in enumerate(zip(pads, filter_shape, strict=True)):
    before = f - 1 - lo
    mirrored.append((before, in_shape[batch_ndim + 2 * k] + f - 1 - g.shape[batch_ndim + 2 * k]
                     - before))
  return (_shifted_sum(g, filter_shape, tuple(mirrored), batch_ndim),)


_shifted_sum.defvjp(_shifted_sum_fwd, _shifted_sum_bwd)


def _shifted_full_spatial_conv(original):
  """neural-tangents' `_conv_kernel_full_spatial_shared`, by shifted sums on CPU.

  The covariance of a stride-1 convolution's outputs at positions (h, h', w, w') is the mean of
  the input covariance at (h + dh, h' + dh, w + dw, w' + dw) over the filter offsets (dh, dw):
  neural-tangents computes it, one spatial axis pair at a time, as a convolution with a diagonal
  filter after moving the pair to the end. XLA:CPU runs those one-channel convolutions slowly;
  a fused sum of f_h * f_w shifted slices gives the same numbers about 10x faster (measured on
  28x28 MNIST covariances). Like the original, the output lists the spatial axis pairs in reverse
  order. Other strides and paddings, and other platforms, use the original.
  """

  def conv(lhs, filter_shape, strides, padding, batch_ndim):
    if (lhs is None or lhs.ndim == 0 or jax.default_backend() != "cpu"
        or any(s != 1 for s in strides) or padding.name not in ("SAME", "VALID")):
      return original(lhs, filter_shape, strides, padding, batch_ndim)
    filter_shape = tuple(int(f) for f in filter_shape)
    pads = tuple(((f - 1) // 2, f // 2) if padding.name == "SAME" else (0, 0)
                 for f in filter_shape)
    out = _shifted_sum(lhs, filter_shape, pads, batch_ndim) / math.prod(filter_shape)
    reverse = [batch_ndim + 2 * i + j for i in reversed(range(len(filter_shape))) for j in (0, 1)]
    return jax.numpy.transpose(out, list(range(batch_ndim)) + reverse)

  conv.original = original
  return conv


def _patch_full_spatial_conv() -> None:
  linear = sys.modules["neural_tangents._src.stax.linear"]
  original = linear._conv_kernel_full_spatial_shared
  if getattr(original, "original", None) is None:
    linear._conv_kernel_full_spatial_shared = _shifted_full_spatial_conv(original)
    PATCHED.append("neural_tangents._src.stax.linear._conv_kernel_full_spatial_shared (speed)")


_patch_full_spatial_conv()
