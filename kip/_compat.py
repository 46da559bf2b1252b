"""Make neural-tangents 0.6.5 import and run on current JAX (0.10.x).

neural-tangents 0.6.5 (the latest release, 2023) imports names that JAX has since moved or removed.
Importing this module, before `neural_tangents`, puts each missing name back where neural-tangents
looks for it, pointing at the current JAX object that does the same job. Nothing that exists in
JAX or SciPy is replaced, so those patches are no-ops on a JAX that still has the old names.
After the import, a few neural-tangents internals that call JAX APIs whose signature or meaning
changed are given a module namespace of their own or swapped for a version written against the
current API (`_patch_empirical`, `_patch_predict`); each is listed below with the reason it is
needed. Use `from kip._compat import nt, stax` everywhere instead of importing neural-tangents
directly.

Two patches are for speed, not compatibility, both on CPU only: the covariance of a convolution
with full spatial covariances (the pooled ConvNet kernels) is computed by summing shifted slices
instead of neural-tangents' depthwise convolutions with a diagonal filter (same numbers, same
layout, about 10x faster, differentiable in both autodiff modes: `_shifted_full_spatial_conv`);
and the ReLU kernels' angle, `arctan2`, comes from a polynomial, 5x faster than XLA's
(`_fast_arctan2`). Every
neural-tangents internal we touch is here."""

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


class _Overlay(types.ModuleType):
  """A module as one neural-tangents module sees it: the names given here, then the module's own.

  Set as that module's global (`empirical.ad = _Overlay(...)`), it changes what neural-tangents
  reads there and nothing anyone else reads.
  """

  def __init__(self, module: types.ModuleType, **names: object):
    super().__init__(module.__name__, f"{module.__name__} as neural-tangents sees it (kip._compat)")
    self.__dict__.update(names)
    self.__dict__["_module"] = module

  def __getattr__(self, name: str):
    return getattr(self.__dict__["_module"], name)


class _NeverAnInstance:
  """Stands in for a removed type that an `isinstance`/`type(x) is` test must never match."""


def _linearize(fun, *primals, has_aux: bool = False):
  """`jax.interpreters.ad.linearize` with the signature and results neural-tangents expects.

  neural-tangents' structured-derivatives NTK (`empirical._get_primals_out_and_pullback`) calls
  `ad.linearize(fn_flat, *primals_flat, has_aux=False)` on a `linear_util.WrappedFun` of flat
  arguments and reads back (flat primal outputs, one `PartialVal` per output, the linear jaxpr
  of the output tangents, its constants). Current JAX has `linearize(traceable,
  primals_flat_tree, has_aux, is_vjp)` returning (FlatTree of outputs, which outputs have zero
  tangents, jaxpr, constants): the same jaxpr (nonzero tangents only), packaged differently.
  """
  from jax._src.interpreters import ad, partial_eval  # noqa: PLC0415
  from jax._src.tree_util import FlatTree  # noqa: PLC0415

  if has_aux:
    raise NotImplementedError("neural-tangents 0.6.5 only calls linearize with has_aux=False")
  out_flat, out_zeros, jaxpr, consts = ad.linearize(fun.call_wrapped, FlatTree.flatten(primals))
  out = list(out_flat.vals)
  pvals = []
  for value, zero in zip(out, out_zeros, strict=True):
    aval = jax.typeof(value).to_tangent_aval()
    pvals.append(partial_eval.PartialVal.known(ad.Zero(aval)) if zero
                 else partial_eval.PartialVal.unknown(aval))
  return out, pvals, jaxpr, consts


def _transpose_eqn(eqn, cts_in, *invals):
  """neural-tangents' `empirical._eqn_vjp_fn`: the transpose of one equation of a linear jaxpr.

  Returns one cotangent per `eqn.invars` (None where the input is known). Theirs tests
  `Primitive.map_primitive` (removed) and calls `get_primitive_transpose` with JAX 0.4's calling
  conventions, but in current JAX some primitives (`slice`, `jit`, `scan`, `cond`,
  `custom_jvp_call`, ...) have only "fancy" transposes, which accumulate into their undefined
  inputs instead of returning cotangents. This dispatches as JAX's own `backward_pass` does, per
  equation. (Not through `backward_pass` itself: with structured derivatives neural-tangents
  trims the equation's parameters and cotangents to size-1 axes but not its variables' types,
  which `backward_pass` checks.)
  """
  from jax._src.interpreters import ad  # noqa: PLC0415

  if eqn is None:  # neural-tangents' identity "equation"
    return (cts_in,)
  undefined = [ad.is_undefined_primal(x) for x in invals]
  if type(cts_in) is ad.Zero:
    return [ad.Zero(x.aval) if u else None for x, u in zip(invals, undefined, strict=True)]
  primitive = eqn.primitive
  if primitive in ad.fancy_transposes:
    args = [ad.ValAccum(x.aval) if u else x for x, u in zip(invals, undefined, strict=True)]
    ad.fancy_transposes[primitive](cts_in, *args, **eqn.params)
    return [a.freeze() if u else None for a, u in zip(args, undefined, strict=True)]
  rule = ad.get_primitive_transpose(primitive)
  if primitive.call_primitive:
    params = dict(eqn.params)
    call_jaxpr = params.pop("call_jaxpr")
    cts_out = rule(params, call_jaxpr, list(invals), cts_in, [v.aval for v in eqn.outvars])
  else:
    cts_out = rule(cts_in, *invals, **eqn.params)
  return [ct if u else None for ct, u in zip(cts_out, undefined, strict=True)]


def _get_flops(f, optimize: bool, *args, **kwargs) -> float:
  """neural-tangents' `empirical._get_flops` (the cost model of `NtkImplementation.AUTO`):
  `Compiled.cost_analysis()` returned a list of dicts when it was written and returns a dict now."""
  lowered = jax.jit(f).lower(*args, **kwargs)
  analysis = lowered.compile().cost_analysis() if optimize else lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return analysis["flops"]


def _patch_empirical() -> None:
  # `nt.empirical_ntk_fn(..., implementation=AUTO)` compiles each implementation and compares
  # XLA's FLOP counts; only the shape of `cost_analysis()`'s result changed.
  import inspect  # noqa: PLC0415

  from jax._src.interpreters import ad  # noqa: PLC0415

  empirical = sys.modules["neural_tangents._src.empirical"]
  if getattr(empirical._get_flops, "__module__", None) != __name__:
    empirical._get_flops = _get_flops
    PATCHED.append("neural_tangents._src.empirical._get_flops (cost_analysis() is a dict)")
  # The structured-derivatives NTK (NT's default in its tests, and its fastest) re-implements
  # JAX's linearise-and-transpose over `jax.interpreters.ad` internals. On a JAX that still has
  # `linearize(traceable, *primals)` it runs as is.
  if any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(ad.linearize).parameters.values()):
    return
  if isinstance(empirical.ad, _Overlay):
    return
  # `empirical.ad` becomes `jax._src.interpreters.ad` (which still has `source_info_util`,
  # `reducing_transposes` and the other names it reads; the public module dropped them) with the
  # old `linearize`; and `config.jax_enable_checks` always False: under that flag neural-tangents
  # runs an extra assertion on `core.get_aval`, `core.lattice_join` and `strip_named_shape`, all
  # removed.
  empirical.ad = _Overlay(ad, linearize=_linearize,
                          config=types.SimpleNamespace(jax_enable_checks=False))
  # `core.DShapedArray` (dynamic shapes, since removed) only appears in a `type(a) is` test.
  empirical.core = _Overlay(jax.core, DShapedArray=_NeverAnInstance)
  empirical._eqn_vjp_fn = _transpose_eqn
  PATCHED.append("neural_tangents._src.empirical.{ad.linearize, core.DShapedArray, _eqn_vjp_fn}"
                 " (structured derivatives)")


def _on_own_trace(fn):
  """Under `jax.core.eval_context()`, runs `fn` on the trace of its first traced argument.

  `nt.predict` builds its Cholesky and eigendecomposition solvers inside `eval_context()`, so
  that a solver computed from a concrete kernel is not staged into a caller's `jit` and cached
  there. Before JAX's "stackless" tracing rewrite (late 2024), operations on a tracer inside that
  context still went to the tracer's own transformation; now `eval_context()` makes every operation
  eager, and a traced kernel (`vmap` over random networks, each with its own empirical kernel)
  raises `UnexpectedTracerError`. This restores the old rule for these two functions only.
  """
  from jax._src import core  # noqa: PLC0415

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.extend.core.take_current_trace() as current:
      pass
    if current is core.eval_trace:
      for leaf in jax.tree_util.tree_leaves((args, kwargs)):
        if isinstance(leaf, core.Tracer):
          with jax.extend.core.set_current_trace(leaf._trace):
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)

  wrapped.original = fn
  return wrapped


def _wrap_once(module: str, name: str, wrap, why: str) -> None:
  """Replaces `module.name` by `wrap(original)`, a function that keeps the original as its
  `.original` (so a second import finds it wrapped and leaves it), and lists it in PATCHED."""
  owner = sys.modules[module]
  original = getattr(owner, name)
  if getattr(original, "original", None) is None:
    setattr(owner, name, wrap(original))
    PATCHED.append(f"{module}.{name} ({why})")


def _patch_predict() -> None:
  from jax._src import core  # noqa: PLC0415

  if not hasattr(core, "eval_trace"):  # a JAX from before the stackless rewrite
    return
  for name in ("_get_cho_solve", "_get_fns_in_eigenbasis"):
    _wrap_once("neural_tangents._src.predict", name, _on_own_trace,
               "traced kernels in eval_context")


_patch_empirical()
_patch_predict()


def _slice_sum(x, filter_shape, pads, batch_ndim):
  """out[..., i, i', j, j'] = sum over offsets (a, b) of zero-padded x[..., i+a, i'+a, j+b, j'+b].

  `pads[k] = (lo, hi)` pads both axes of spatial pair k: one padded copy, f_h * f_w slices of it.
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


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _shifted_sum(x, filter_shape, pads, batch_ndim):
  """`_slice_sum`, with a tangent rule that keeps both autodiff modes fast.

  The op is linear, so its tangent is the op applied to the tangent, and reverse mode transposes
  that. Written as slices, JAX would transpose it into f_h * f_w zero-embeddings of the
  cotangent, which XLA:CPU fuses with the cotangent's producer and so recomputes once per offset
  (a 3x slower gradient of the pooled ConvNet NTK). So the tangent is written as JAX's transpose
  of the adjoint (the same sum over the mirrored padding, as slices): reverse mode transposes it
  back into those slices, one padded copy of the cotangent, as fast as a hand-written VJP; and
  forward mode (jvp, jacfwd, Hessians) works, evaluating the embeddings, which is where the
  fusion costs: a forward-mode derivative of the ConvNet NTK runs 1.7x slower than through
  neural-tangents' own convolutions (`python -m bench.compat_conv`). Of the formulations tried
  (slices, pads of shifts), none that JAX transposes by itself was fast both ways; a `custom_vjp`
  refuses forward mode, and `custom_derivatives.linear_call` has no batching rule.
  """
  return _slice_sum(x, filter_shape, pads, batch_ndim)


def _adjoint_pads(filter_shape, pads, batch_ndim, in_shape, out_shape):
  # x_bar[j] = sum_d g[j - d + lo]: the same sum over g padded by (f - 1 - lo) before and by
  # whatever brings it back to the input's length after.
  mirrored = []
  for k, ((lo, _), f) in enumerate(zip(pads, filter_shape, strict=True)):
    before = f - 1 - lo
    mirrored.append((before, in_shape[batch_ndim + 2 * k] + f - 1 - out_shape[batch_ndim + 2 * k]
                     - before))
  return tuple(mirrored)


@_shifted_sum.defjvp
def _shifted_sum_jvp(filter_shape, pads, batch_ndim, primals, tangents):
  (x,), (t,) = primals, tangents
  out = _shifted_sum(x, filter_shape, pads, batch_ndim)
  mirrored = _adjoint_pads(filter_shape, pads, batch_ndim, x.shape, out.shape)

  def adjoint(g):
    return _slice_sum(g, filter_shape, mirrored, batch_ndim)

  (t_out,) = jax.linear_transpose(adjoint, jax.ShapeDtypeStruct(out.shape, out.dtype))(t)
  return out, t_out


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


_wrap_once("neural_tangents._src.stax.linear", "_conv_kernel_full_spatial_shared",
           _shifted_full_spatial_conv, "speed")


# atan(u) = u + u^3 Q(u^2) on |u| <= tan(pi/8): Q's coefficients, lowest first, fitted here by
# least squares on Chebyshev nodes in float64 (relative error under 3e-9 there; float32 rounding
# dominates what is left).
_ATAN_Q = (-0.3333333262, 0.1999963649, -0.1426630981, 0.1076372946, -0.06506835526)
_TAN_PI_8 = math.tan(math.pi / 8)


def _polynomial_arctan2(x, y):
  """`jnp.arctan2(x, y)` (the angle of the point (y, x)) from a polynomial: reduced to
  t = min(|x|, |y|) / max(|x|, |y|) in [0, 1], then to |u| <= tan(pi/8) by
  atan(t) = pi/4 + atan((t - 1) / (t + 1)), and unfolded by octant. Float32 error as jnp's
  (about 2.5e-7 absolute, and relative for small angles); 0 at the origin, as jnp's."""
  jnp = jax.numpy
  ax, ay = jnp.abs(x), jnp.abs(y)
  low, high = jnp.minimum(ax, ay), jnp.maximum(ax, ay)
  t = low / jnp.where(high > 0, high, 1)
  folded = t > _TAN_PI_8
  u = jnp.where(folded, (t - 1) / (t + 1), t)
  z = u * u
  q = _ATAN_Q[-1]
  for c in _ATAN_Q[-2::-1]:
    q = q * z + c
  angle = u + u * z * q
  angle = jnp.where(folded, angle + math.pi / 4, angle)
  angle = jnp.where(ax > ay, math.pi / 2 - angle, angle)
  angle = jnp.where(y < 0, math.pi - angle, angle)
  return jnp.where(x < 0, -angle, angle)


def _fast_arctan2(original):
  """neural-tangents' `_arctan2` (the angle in every ReLU kernel: one per covariance entry),
  by `_polynomial_arctan2` on CPU, where XLA's arctan2 costs about 29 ns an element against 6
  (measured on 16M float32 pairs): the arc-cosine maps were a third of the pooled ConvNet
  kernel's time. Float32 only (its error is float32's): float64 inputs, and other platforms,
  take the original. The derivative rule is neural-tangents' own (the original's custom JVP),
  so values agree to float32 rounding and gradients are unchanged in form."""

  @functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
  def arctan2(x, y, fill_zero=None):
    # The polynomial is exact to float32 only: float64 kernels (`--float64`) keep XLA's.
    if (jax.default_backend() != "cpu"
        or jax.numpy.result_type(x, y) != jax.numpy.float32):
      return original(x, y, fill_zero)
    angle = _polynomial_arctan2(x, y)
    if fill_zero is not None:
      angle = jax.numpy.where((x == 0.0) & (y == 0.0), fill_zero, angle)
    return angle

  @arctan2.defjvp
  def _(fill_zero, primals, tangents):
    (x, y), (x_dot, y_dot) = primals, tangents
    denominator = jax.numpy.maximum(x**2 + y**2, 1e-30)  # the original's rule
    return arctan2(x, y, fill_zero), x_dot * (y / denominator) - y_dot * (x / denominator)

  arctan2.original = original
  return arctan2


_wrap_once("neural_tangents._src.stax.elementwise", "_arctan2", _fast_arctan2, "speed")
