"""Trajectory matching, the code MTT, DATM and PAD share: expert trajectories on disk, the
training of an expert in the one loop, and the unrolled student whose end point is matched.

Experts (Cazenavette et al., CVPR 2022, `buffer.py`): networks trained on real data by plain SGD
(lr 0.01, no momentum, no weight decay, batch 256, DSA drawn per image), their parameters stored
after every epoch. An `ExpertStore` is a folder:

    store.json        the settings that made the experts and the parameter count; a run that needs
                      other settings is refused (`StoreMismatch`), never silently served
    expert_000/       one expert, written as a unit (`kip.store.Store`): trajectory.npy
                      (epochs + 1, n_params) float32, row e = the parameters after e epochs,
                      flattened in `jax.flatten_util.ravel_pytree` order, read memory-mapped (a
                      distillation holds two rows, not every expert); record.json: its test
                      accuracy and timings
    difficulty.npy    (PAD) the per-image difficulty score the curriculum sorted by
    work/expert_003/  the loop's workdir of the expert in progress (checkpoints, epoch rows);
                      removed once its entry is written

PAD's experts (Li et al., 2024) see each class's training images in order of difficulty (EL2N,
`el2n_scores`): the easiest `init_ratio` at first, growing linearly to all of them by epoch
`add_end_epoch`, then the easiest `fraction` dropped from each `(epoch, fraction)` of `drops` on
(`curriculum_window`).

The student (`make_trajectory_matching`): start from expert `i`'s parameters after epoch `t`,
take `syn_steps` SGD steps on minibatches of the synthetic set (DSA per image) at a learnable
rate, and compare its end point with the expert's parameters `expert_epochs` later:

    loss = ||theta_student - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2,

sums over the parameters a `param_mask` keeps (PAD leaves the shallowest layers out). The unroll
is a `lax.scan` of rematerialised steps: the backward pass stores one parameter vector per student
step and recomputes each step's activations, so memory grows with `syn_steps` by a parameter
vector, not by a network's activations (on CPU the scan is compiled unrolled and not
rematerialised, which there saves no memory: see `unroll` and `remat`).
Images, the learning rate and (DATM) soft labels are learned by SGD with momentum through the
whole unroll.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from kip.augment import apply_augment
from kip.io import atomic_write
from kip.loop import Evaluator, LoopConfig, NonFiniteLossError, run
from kip.method import Batch, Data, Method, Trainer
from kip.store import Store, StoreMismatch

__all__ = ["ExpertStore", "StoreMismatch", "curriculum_window", "epoch_plan", "el2n_scores",
           "expert_steps",
           "make_expert", "train_expert", "trajectory_loss", "depth_mask", "smallest_error_mask",
           "make_student", "make_trajectory_matching", "TrajectoryState"]

class ExpertStore:
  """A folder of expert trajectories (see the module docstring) on `kip.store.Store`.
  `settings`: the JSON-able dict of everything that made the experts; `num_params`: the length of
  a flattened parameter vector."""

  WHAT, HINT = "expert store", "make one with python -m experiments.buffer"

  def __init__(self, store: Store):
    self.store, self.path, self.settings = store, store.path, store.settings
    self.num_params, self.epochs = store.meta["num_params"], store.meta["epochs"]

  @classmethod
  def create(cls, path: str, settings: dict, num_params: int, epochs: int) -> ExpertStore:
    """Opens the store at `path`, making it if absent; one made with other settings raises
    `StoreMismatch` naming what differs."""
    return cls._checked(Store.open(path, settings, meta={"num_params": num_params,
                                                         "epochs": epochs},
                                   what=cls.WHAT, hint=cls.HINT))

  @classmethod
  def open(cls, path: str, settings: dict | None = None, *, num_params: int | None = None,
           epochs: int | None = None) -> ExpertStore:
    """The store at `path`; with `settings` (and `num_params`, `epochs`) given, checked to have
    been made with exactly those."""
    meta = {k: v for k, v in (("num_params", num_params), ("epochs", epochs)) if v is not None}
    return cls._checked(Store.open(path, settings, create=False, meta=meta, what=cls.WHAT,
                                   hint=cls.HINT))

  @classmethod
  def _checked(cls, store: Store) -> ExpertStore:
    if any(n.startswith("expert_") and n.endswith(".npy") for n in os.listdir(store.path)):
      raise StoreMismatch(f"the expert store {store.path} is in the layout before experts were "
                          "written as units (expert_000.npy beside expert_000.json); make it "
                          "again with python -m experiments.buffer, or use another folder")
    return cls(store)

  @staticmethod
  def _entry(i: int) -> str:
    return f"expert_{i:03d}"

  def experts(self) -> list[int]:
    """Indices of the finished experts, ascending."""
    return [int(n[len("expert_"):]) for n in self.store.entries("expert_")]

  def add(self, i: int, trajectory: np.ndarray, record: dict) -> None:
    """Stores expert `i` (trajectory (epochs + 1, num_params) float32, and its record) as a
    unit: a kill while it is written leaves no expert `i`, never half of one. A trajectory that
    is not finite everywhere (a diverged expert, which MTT, DATM and PAD would match) is
    refused."""
    trajectory = np.asarray(trajectory, np.float32)
    if trajectory.shape != (self.epochs + 1, self.num_params):
      raise ValueError(f"an expert trajectory must be {(self.epochs + 1, self.num_params)}, got "
                       f"{trajectory.shape}")
    finite = np.isfinite(trajectory).all(axis=1)
    if not finite.all():  # the loop sees a step's loss before its update: the last one is here
      raise NonFiniteLossError(
          f"expert {i} diverged: its parameters are not finite from epoch "
          f"{int(np.argmin(finite))} on, so it is not stored; use a lower --lr (or --momentum, "
          "--weight-decay)")
    self.store.put(self._entry(i), {"trajectory.npy": trajectory, "record.json": record})

  def trajectory(self, i: int) -> np.ndarray:
    """Expert `i`'s (epochs + 1, num_params) float32 trajectory, memory-mapped (read lazily)."""
    return np.load(self.store.file(self._entry(i), "trajectory.npy"), mmap_mode="r")

  def record(self, i: int) -> dict:
    with open(self.store.file(self._entry(i), "record.json")) as f:
      return json.load(f)

  def work_dir(self, i: int) -> str:
    return self.store.work_dir(self._entry(i))


# ----------------------------------------------------------------------------- curriculum (PAD)

def curriculum_window(epoch: int, *, init_ratio: float = 1.0, add_end_epoch: int = 0,
                      drops: Sequence[tuple[int, float]] = ()) -> tuple[float, float]:
  """(lo, hi): at `epoch` (0-based) an expert trains on the fractions [lo, hi) of each class's
  images sorted from easiest to hardest. `hi` grows linearly from `init_ratio` at epoch 0 to 1 at
  `add_end_epoch`; `lo` is the fraction of the latest `(epoch, fraction)` drop reached."""
  if add_end_epoch > 0 and init_ratio < 1:
    hi = min(1.0, init_ratio + (1.0 - init_ratio) * epoch / add_end_epoch)
  else:
    hi = 1.0
  lo = max([f for e, f in drops if epoch >= e], default=0.0)
  return lo, hi


def epoch_plan(labels: np.ndarray, epochs: int, *, order: np.ndarray | None = None,
               window: Callable[[int], tuple[float, float]] | None = None) -> list[np.ndarray]:
  """The training images of each epoch: a list of `epochs` index arrays (sorted). Without
  `order`, every image every epoch; with it ((n,) indices, easiest first) and `window`, each
  class's images in `order` restricted to the epoch's [lo, hi) fractions."""
  n = len(labels)
  if order is None or window is None:
    return [np.arange(n) for _ in range(epochs)]
  plan = []
  classes = np.unique(labels)
  by_class = [order[labels[order] == c] for c in classes]  # each class, easiest first
  for e in range(epochs):
    lo, hi = window(e)
    parts = [idx[int(np.floor(lo * len(idx))):max(int(np.ceil(hi * len(idx))), 1)]
             for idx in by_class]
    plan.append(np.sort(np.concatenate(parts)))
  return plan


# ----------------------------------------------------------------------------- experts

class ExpertState(NamedTuple):
  """One expert in training: params, the optimiser's state, the number of steps taken."""

  params: Any
  opt_state: Any
  step: jax.Array


def _xent(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean cross-entropy of (n, C) logits against (n, C) probabilities."""
  return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1))


def make_expert(model, image_shape: tuple[int, int, int], *, lr: float = 0.01,
                momentum: float = 0.0, weight_decay: float = 0.0, augment: str = "") -> Trainer:
  """An expert's training as a `kip.method.Trainer`: SGD on batches of (images, int labels) that
  the caller's sampler provides (`Batch(x, y)`, y (n,) int32), augmented per image."""
  tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum=momentum))

  def init(key, x_init=None, y_init=None) -> ExpertState:
    del x_init, y_init
    params = model.init(key, jnp.zeros((1, *image_shape)), train=False)["params"]
    return ExpertState(params, tx.init(params), jnp.zeros((), jnp.int32))

  @functools.partial(jax.jit, donate_argnums=0)
  def update(state: ExpertState, batch: Batch, key: jax.Array, step: jax.Array):
    x = apply_augment(key, batch.x, augment, batch_mode=False) if augment else batch.x

    def loss_fn(params):
      logits = model.apply({"params": params}, x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch.y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    # int32 as `init` makes it: a weak-typed step (a Python int's) would change the state's type
    # after one step, and compile the step a second time.
    step = jnp.asarray(step, jnp.int32)
    return ExpertState(optax.apply_updates(state.params, updates), opt_state, step), {
        "loss": loss}

  return Trainer(init, update, Data("none"))


def expert_steps(plan: list[np.ndarray], batch: int) -> int:
  """The steps of one expert trained through `plan` at `batch` (as `_epoch_sampler` runs them)."""
  return sum(-(-len(p) // min(batch, len(p))) for p in plan)


def _epoch_sampler(x: np.ndarray, labels: np.ndarray, plan: list[np.ndarray], batch: int,
                   seed: int) -> tuple[Callable[[int], Batch], np.ndarray]:
  """step (1-based) -> the step's batch, and the last step of every epoch. Each epoch is
  ceil(n_e / batch) steps through a permutation of its images (rng [seed, epoch]); the last batch
  is the permutation's final `batch` images (fixed shapes for jit)."""
  sizes = [min(batch, len(p)) for p in plan]
  per_epoch = [-(-len(p) // b) for p, b in zip(plan, sizes, strict=True)]
  ends = np.cumsum(per_epoch)
  if len(set(sizes)) != 1:
    raise ValueError(f"every epoch needs at least {batch} images (batch); the curriculum leaves "
                     f"{min(len(p) for p in plan)}")

  def sampler(step: int) -> Batch:
    e = int(np.searchsorted(ends, step))  # epoch of this 1-based step
    j = step - 1 - (ends[e - 1] if e else 0)
    perm = plan[e][np.random.default_rng([seed, e]).permutation(len(plan[e]))]
    start = min(j * sizes[e], len(perm) - sizes[e])
    idx = np.sort(perm[start:start + sizes[e]])
    return Batch(jnp.asarray(x[idx]), jnp.asarray(labels[idx], jnp.int32))

  return sampler, ends


def train_expert(store: ExpertStore, i: int, model, x_train: np.ndarray,
                 labels_train: np.ndarray, *, plan: list[np.ndarray], batch: int, lr: float,
                 momentum: float = 0.0, weight_decay: float = 0.0, augment: str = "",
                 seed: int = 0, evaluate: Callable[[Any], float] | None = None,
                 log: Callable[[str], None] = print, progress: bool = True,
                 span: tuple[int, int] | None = None) -> dict:
  """Trains expert `i` (if the store lacks it) in the one loop, resumably, in
  `store.work_dir(i)`, writing its parameters after every epoch of `plan`; then stores the
  trajectory and removes the work folder. `evaluate(params) -> test accuracy` runs at the end.
  `span`: the progress bar's place among all the experts (see `kip.loop.run`). Returns the
  expert's record."""
  if i in store.experts():
    return store.record(i)
  image_shape = x_train.shape[1:]
  method = make_expert(model, image_shape, lr=lr, momentum=momentum, weight_decay=weight_decay,
                       augment=augment)
  sampler, ends = _epoch_sampler(x_train, labels_train, plan, batch, seed)
  workdir = store.work_dir(i)
  rows = os.path.join(workdir, "epochs")
  row_of = {0: 0, **{int(s): e + 1 for e, s in enumerate(ends)}}

  def record_epoch(state: ExpertState) -> dict:
    step = int(state.step)
    if step not in row_of:
      return {}
    flat, _ = ravel_pytree(state.params)
    atomic_write(os.path.join(rows, f"epoch_{row_of[step]:03d}.npy"),
                 np.asarray(flat, np.float32))
    out = {"epoch": row_of[step]}
    if step == int(ends[-1]) and evaluate is not None:
      out["test_acc"] = evaluate(state.params)
    return out

  config = LoopConfig(steps=int(ends[-1]), eval_every=1, eval_at_start=True,
                      checkpoint_every=int(ends[0]), log_every=50, seed=seed)
  result = run(method, workdir=workdir, config=config, sampler=sampler,
               evaluators=[Evaluator("trajectory", record_epoch, 1)], log=log, progress=progress,
               description=f"expert {i}", span=span)
  trajectory = np.stack([np.load(os.path.join(rows, f"epoch_{e:03d}.npy"))
                         for e in range(len(plan) + 1)])
  record = {"expert": i, "seed": seed, "steps": int(ends[-1]), "epochs": len(plan),
            "test_acc": result.evals.get("test_acc"), "train_time": result.train_time,
            "wall_time": result.wall_time}
  store.add(i, trajectory, record)
  shutil.rmtree(workdir, ignore_errors=True)
  return record


def el2n_scores(model, x_train: np.ndarray, labels_train: np.ndarray, num_classes: int, *,
                nets: int, steps: int, batch: int, lr: float, seed: int,
                chunk: int = 1000) -> np.ndarray:
  """EL2N difficulty (Paul et al., NeurIPS 2021): ||softmax(f(x)) - onehot(y)||_2 averaged over
  `nets` networks, each trained `steps` SGD steps (momentum 0.9) on random batches; (n,) float32,
  larger = harder."""
  trainer = make_expert(model, x_train.shape[1:], lr=lr, momentum=0.9)

  @jax.jit
  def error(params, x, y):
    p = jax.nn.softmax(model.apply({"params": params}, x, train=False))
    return jnp.linalg.norm(p - jax.nn.one_hot(y, num_classes), axis=-1)

  scores = np.zeros(len(x_train), np.float64)
  for k in range(nets):
    state = trainer.init(jax.random.key(seed * 1000 + k))
    rng = np.random.default_rng([seed, k])
    for step in range(1, steps + 1):
      idx = rng.choice(len(x_train), batch, replace=False)
      batch_k = Batch(jnp.asarray(x_train[idx]), jnp.asarray(labels_train[idx], jnp.int32))
      state, _ = trainer.update(state, batch_k, jax.random.key(0), jnp.asarray(step))
    params = state.params
    for start in range(0, len(x_train), chunk):
      sl = slice(start, start + chunk)
      scores[sl] += np.asarray(error(params, x_train[sl], labels_train[sl]))
  return (scores / nets).astype(np.float32)


# ----------------------------------------------------------------------------- matching

def trajectory_loss(theta_student: jax.Array, theta_start: jax.Array, theta_target: jax.Array,
                    mask: jax.Array | None = None) -> jax.Array:
  """||theta_student - theta_target||^2 / ||theta_start - theta_target||^2 over the (P,) vectors'
  entries that `mask` (P,) keeps (all without one)."""
  m = 1.0 if mask is None else mask
  return jnp.sum(m * (theta_student - theta_target) ** 2) / jnp.sum(
      m * (theta_start - theta_target) ** 2)


def make_student(model, unravel: Callable, *, syn_steps: int, batch_syn: int = 0,
                 augment: str = "", remat: bool = True, unroll: bool = False) -> Callable:
  """(x (n, H, W, C), targets (n, C) probabilities, lr (), theta0 (P,), key) -> theta (P,): the
  student's parameters after `syn_steps` SGD steps on the mean cross-entropy of `batch_syn`
  images (0, or more than the set holds: all) each, drawn by cycling through random permutations
  of the set, each minibatch augmented per image by `augment`. Differentiable in x, targets, lr
  and theta0."""

  def student_loss(theta, x, targets):
    return _xent(model.apply({"params": unravel(theta)}, x, train=True), targets)

  def student(x, targets, lr, theta0, key):
    n = x.shape[0]
    b = min(batch_syn, n) if batch_syn else n
    rounds = -(-syn_steps * b // n)
    k_perm, k_aug = jax.random.split(key)
    perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(k_perm, rounds))
    idx = perms.reshape(-1)[:syn_steps * b].reshape(syn_steps, b)

    def body(theta, inputs):
      i, k = inputs
      xb = x[i]
      if augment:
        xb = apply_augment(k, xb, augment, batch_mode=False)
      return theta - lr * jax.grad(student_loss)(theta, xb, targets[i]), None

    body = jax.checkpoint(body) if remat else body
    theta, _ = jax.lax.scan(body, theta0, (idx, jax.random.split(k_aug, syn_steps)),
                            unroll=unroll)
    return theta

  return student


def depth_mask(params, ratio: float) -> np.ndarray:
  """(P,) float32 in `ravel_pytree(params)` order: 0 for the shallowest `floor(ratio * P)`
  parameters, 1 for the rest (PAD's paper). Depth is the block index of a top-level module
  (`conv_2`, `norm_2` -> 2; a module without one, the readout, is deepest); within a block, its
  modules and leaves in `ravel_pytree` order."""
  if not 0 <= ratio < 1:
    raise ValueError(f"the shallow-parameter ratio must be in [0, 1), got {ratio}")

  def depth(name):
    tail = name.rsplit("_", 1)[-1]
    return (int(tail), name) if tail.isdigit() else (float("inf"), name)

  total = sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(params))
  left = int(np.floor(ratio * total))
  tree = {}
  for name in sorted(params, key=depth):
    leaves, treedef = jax.tree_util.tree_flatten(params[name])
    masks = []
    for leaf in leaves:
      flat = np.ones(int(np.size(leaf)), np.float32)
      cut = min(left, flat.size)
      flat[:cut], left = 0.0, left - cut
      masks.append(flat.reshape(np.shape(leaf)))
    tree[name] = jax.tree_util.tree_unflatten(treedef, masks)
  return np.asarray(ravel_pytree(tree)[0], np.float32)


def smallest_error_mask(theta: jax.Array, theta_target: jax.Array, fraction: float) -> jax.Array:
  """(P,) 0 for the `floor(fraction * P)` entries with the smallest (theta - target)^2, 1 else."""
  err = (theta - theta_target) ** 2
  k = int(np.floor(fraction * err.size))
  if k == 0:
    return jnp.ones_like(err)
  threshold = jnp.sort(err)[k - 1]
  return (err > threshold).astype(err.dtype)


class TrajectoryState(NamedTuple):
  """x: (n, H, W, C) synthetic images; y: (n, C) labels (hard: one-hot; soft: learned logits);
  lr: () the student's learnable learning rate; opt_*: their optimisers' states."""

  x: jax.Array
  y: jax.Array
  lr: jax.Array
  opt_x: Any
  opt_y: Any
  opt_lr: Any


def make_trajectory_matching(
    model, params_template, store: ExpertStore, *, image_shape: tuple[int, int, int],
    syn_steps: int = 20, expert_epochs: int = 2,
    max_start_epoch: int | Callable[[int], int] = 20, batch_syn: int = 0,
    lr_img: float = 100.0, lr_lr: float = 1e-5, lr_init: float = 0.01, lr_y: float = 0.0,
    momentum: float = 0.5, y_momentum: float = 0.9, soft_labels: bool = False,
    augment: str = "", param_mask: np.ndarray | None = None,
    skip_above: float = 0.0, experts: Sequence[int] | None = None, seed: int = 0,
    remat: bool | None = None, unroll: bool | None = None, largest_start: int | None = None,
    drop_smallest: float = 0.0) -> Method:
  """Trajectory matching as a `kip.method.Method` (`Data("none")`: the method reads its expert
  store itself). Each update picks an expert and a start epoch t < max_start_epoch (a function
  of the step for DATM's widening window) from `rng([seed, step])`, reads the two parameter
  vectors from the store, and takes one step of every learned quantity on `trajectory_loss`.

  Args:
    model, params_template: the experts' Flax network and a parameter pytree of its shape (its
      `ravel_pytree` layout is the store's).
    syn_steps: the student's SGD steps; batch_syn: synthetic images per step (0: all), cycling
      through random permutations of the set.
    expert_epochs: M, the epochs between the start and the target checkpoints.
    lr_img, lr_lr, momentum: SGD of the images and of the student's learning rate.
    soft_labels, lr_y, y_momentum: DATM: labels are learned logits (soft cross-entropy) by SGD.
    param_mask: (P,) 1 for the parameters the loss matches (PAD), None for all.
    skip_above: DATM: an update whose loss exceeds this is not applied (0: never skip).
    largest_start: the largest value `max_start_epoch(step)` takes (checked against the store).
    drop_smallest: the official PAD code's mask: leave out this fraction of the parameters, those
      the student matches best at this update (0: off).
    remat: recompute each student step's activations in the backward pass (bounded memory).
      None: only when the steps are compiled as a loop. Compiled unrolled (the CPU), XLA keeps the
      activations anyway (temporary memory of the gradient at 10 student steps, 100 images:
      1,038 MiB with remat, 1,029 without; `bench/results/trajectory_memory.json`) and the
      recomputation is a third of the update's time (MTT's CPU preset at 10 per class: 2.73 s
      with, 1.85 without).
    unroll: compile the student's steps unrolled instead of as a loop (None: on CPU only, where
      XLA runs the convolutions of a loop body about 10x slower than the same ops unrolled:
      bench/trajectory_memory.py; unrolled, compilation grows with `syn_steps`).
  """
  theta_template, unravel = ravel_pytree(params_template)
  if theta_template.size != store.num_params:
    raise StoreMismatch(f"the network has {theta_template.size} parameters, the store's experts "
                        f"{store.num_params}")
  experts = list(store.experts() if experts is None else experts)
  if not experts:
    raise FileNotFoundError(f"the expert store {store.path} holds no finished expert yet")
  unrolled = jax.default_backend() == "cpu" if unroll is None else unroll
  remat = not unrolled if remat is None else remat
  window = max_start_epoch if callable(max_start_epoch) else (lambda step: max_start_epoch)
  largest = largest_start if largest_start is not None else window(1)
  if largest - 1 + expert_epochs > store.epochs:
    raise ValueError(f"start epochs up to {largest - 1} + {expert_epochs} need experts of "
                     f"{largest - 1 + expert_epochs} epochs; the store's have {store.epochs}")
  fixed_mask = None if param_mask is None else jnp.asarray(param_mask)
  opt_x = optax.sgd(lr_img, momentum=momentum)
  opt_lr = optax.sgd(lr_lr, momentum=momentum)
  opt_y = optax.sgd(lr_y or 1.0, momentum=y_momentum)

  student = make_student(model, unravel, syn_steps=syn_steps, batch_syn=batch_syn,
                         augment=augment, remat=remat, unroll=unrolled)

  def targets_of(y):
    return jax.nn.softmax(y) if soft_labels else y

  def loss_fn(learned, theta_start, theta_target, key):
    x, y, lr = learned
    theta = student(x, targets_of(y), lr, theta_start, key)
    mask = fixed_mask
    if drop_smallest:  # the official PAD code: leave out the best-matched parameters
      mask = jax.lax.stop_gradient(smallest_error_mask(theta, theta_target, drop_smallest))
    return trajectory_loss(theta, theta_start, theta_target, mask)

  def init(key, x_init, y_init) -> TrajectoryState:
    del key
    # Copies: the update donates its state, and the caller's arrays must outlive it.
    x = jnp.array(x_init, jnp.float32)
    y = jnp.array(y_init, jnp.float32)
    if not soft_labels:  # hard labels: one-hot of the class, whatever encoding came in
      y = jax.nn.one_hot(jnp.argmax(y, -1), y.shape[-1])
    lr = jnp.asarray(lr_init, jnp.float32)
    return TrajectoryState(x, y, lr, opt_x.init(x), opt_y.init(y), opt_lr.init(lr))

  @functools.partial(jax.jit, donate_argnums=0)
  def match_step(state: TrajectoryState, theta_start, theta_target, key):
    loss, (gx, gy, glr) = jax.value_and_grad(loss_fn)(
        (state.x, state.y, state.lr), theta_start, theta_target, key)
    apply = (skip_above <= 0) | (loss <= skip_above)
    ux, opt_x_state = opt_x.update(gx, state.opt_x, state.x)
    ulr, opt_lr_state = opt_lr.update(glr, state.opt_lr, state.lr)
    new = TrajectoryState(optax.apply_updates(state.x, ux), state.y,
                          optax.apply_updates(state.lr, ulr), opt_x_state, state.opt_y,
                          opt_lr_state)
    if soft_labels and lr_y > 0:
      uy, opt_y_state = opt_y.update(gy, state.opt_y, state.y)
      new = new._replace(y=optax.apply_updates(state.y, uy), opt_y=opt_y_state)
    if skip_above > 0:  # a skipped update keeps every learned quantity and optimiser state
      new = jax.tree_util.tree_map(lambda a, b: jnp.where(apply, a, b), new, state)
    return new, {"loss": loss, "skipped": 1.0 - apply.astype(jnp.float32),
                 "syn_lr": new.lr, "grad_norm": optax.global_norm(gx)}

  def pick(step: int) -> tuple[int, int]:
    """(expert, start epoch) of a step: a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    return experts[int(rng.integers(len(experts)))], int(rng.integers(0, window(step)))

  def update(state: TrajectoryState, batch, key: jax.Array, step: jax.Array):
    del batch
    expert, start = pick(int(step))
    trajectory = store.trajectory(expert)
    theta_start = jnp.asarray(trajectory[start])
    theta_target = jnp.asarray(trajectory[start + expert_epochs])
    state, metrics = match_step(state, theta_start, theta_target, key)
    return state, {**metrics, "expert": expert, "start_epoch": start}

  def export(state: TrajectoryState) -> dict:
    labels = jax.nn.softmax(state.y) if soft_labels else state.y
    return {"images": state.x, "labels": labels, "lr": state.lr,
            **({"label_logits": state.y} if soft_labels else {})}

  return Method(init, update, export, Data("none"))
