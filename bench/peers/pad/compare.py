"""PAD side by side: the official code (bench/peers/pad/official.py) and ours (`experiments.pad`).

Issue 39: DATM's comparison (bench/peers/datm/compare.py, whose machinery, flags and tables
these are) with PAD's experts and parameter selection, at our `cpu` presets: the experts of
`experiments.buffer --preset cpu --curriculum pad` (4 x 6 epochs, each class's easiest 75% at
first, all by epoch 2, the easiest 10% left out from epoch 3 and 20% from epoch 5, EL2N order
from 2 networks x 200 steps), DATM's distillation, and the matching loss without the shallowest
`--ratio` of the parameters (-1: by ipc, 0 at 1, 0.5 at 10).

Expert sets, all under `--root`/experts/: `ours` (our buffer, which also scores the images;
trained first), `official` (`buffer_CL.py`: GSAM, the curriculum on the same order: our scores
and labels written to experts/difficulty.npz) and `official_sgd` (`buffer_CL.py`'s curriculum
with plain SGD, our experts' optimiser: `--no-sam`). Our drop epochs are translated to the
official thresholds (an image set left out "from epoch e" is `--rm-epoch-* e - 1`: the official
code drops after the epoch it names).

Sides (`SIDES`: distiller, selection, experts): `official` (`PAD.py` as it is: the smallest
errors left out) and `ours` (the paper's shallowest parameters, our default) on their own
experts; `official_depth` (the official loop with `PAD_depth.py`'s shallowest-first selection,
the removed code of the paper's method) and `ours_smallest` (ours with `--mask smallest_error`),
which pair each selection with its counterpart; `official_depth_sgd` (`official_depth` on the
official SGD experts: both sides' settings equal throughout); and the crosses
`official_depth_on_ours`, `ours_on_official`. Where the ratio is 0 (ipc 1) the selections leave
nothing out and a side that differs from another only by its selection is not run.

    KIP_MANUAL_DIR=/work/shared/data python bench/peers/pad/compare.py --ipcs 1,10 --seeds 0,1,2
"""

from __future__ import annotations

import gzip
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, REPO)  # run as a script: the repository's packages
from bench.peers.common import read_json, write_json  # noqa: E402
from bench.peers.datm import compare as datm  # noqa: E402
from bench.peers.mtt import compare as mtt  # noqa: E402
from methods.pad import RATIO_BY_IPC  # noqa: E402

BUFFER = datm.BUFFER
DEFAULT_VARIANT = {"official": "loss", "ours": "shallow"}
SIDES = {"official": ("official", "loss", "official"), "ours": ("ours", "shallow", "ours"),
         "official_depth": ("official", "depth", "official"),
         "ours_smallest": ("ours", "smallest_error", "ours"),
         "official_depth_sgd": ("official", "depth", "official_sgd"),
         "official_depth_on_ours": ("official", "depth", "ours"),
         "ours_on_official": ("ours", "shallow", "official")}
CONTRASTS = (
    ("ours", "official", "headline: each as it runs by default (selection differs at ratio > 0)"),
    ("ours", "official_depth", "shallowest left out, own experts: ours - official"),
    ("ours_smallest", "official", "smallest errors left out, own experts: ours - official"),
    ("ours", "official_depth_sgd", "shallowest left out, SGD experts of each code: ours - "
                                   "official"),
    ("ours", "official_depth_on_ours", "distiller, our experts: ours - official"),
    ("ours_on_official", "official_depth", "distiller, official GSAM experts: ours - official"),
    ("official_depth_sgd", "official_depth", "experts, official distiller: SGD - GSAM"),
    ("official_depth_on_ours", "official_depth_sgd", "experts, official distiller: ours - "
                                                     "official SGD"),
    ("ours", "ours_smallest", "ours: shallowest - smallest errors left out"),
    ("official_depth", "official", "official: shallowest - smallest errors left out"))


def add_flags(p) -> None:
  g = p.add_argument_group("PAD (defaults: experiments.buffer / experiments.pad --preset cpu)")
  g.add_argument("--ratio", type=float, default=-1.0,
                 help="fraction of the parameters left out of the loss (-1: by ipc, "
                      + ", ".join(f"{r} from {i}" for i, r in RATIO_BY_IPC) + ")")
  g.add_argument("--init-ratio", type=float, default=BUFFER.init_ratio)
  g.add_argument("--add-end-epoch", type=int, default=BUFFER.add_end_epoch)
  g.add_argument("--drops", default=BUFFER.drops,
                 help="ours: epoch:fraction left out from that epoch on (two, as the official "
                      "script's two stages)")
  g.add_argument("--score-nets", type=int, default=BUFFER.score_nets)
  g.add_argument("--score-steps", type=int, default=BUFFER.score_steps)
  g.add_argument("--mnist-raw", default="/work/shared/data/mnist",
                 help="MNIST's idx .gz files: where the official side finds our scored images")


def mask_ratio(args, ipc: int) -> float:
  return args.ratio if args.ratio >= 0 else [r for i, r in RATIO_BY_IPC if ipc >= i][-1]


def variant_flags(args, side: str, ipc: int) -> list[str]:
  _, variant, _ = SIDES[side]
  ratio = str(mask_ratio(args, ipc))
  return {"loss": ["--mask", "loss", "--loss-ratio", ratio],
          "depth": ["--mask", "depth", "--depth-ratio", ratio],
          "shallow": ["--mask", "shallow", "--ratio", ratio],
          "smallest_error": ["--mask", "smallest_error", "--ratio", ratio]}[variant]


def duplicate_of(args, side: str, ipc: int, sides: list[str]) -> str | None:
  """At ratio 0 the selections leave nothing out: a side that differs from a chosen one only by
  its selection is that side."""
  distiller, variant, experts = SIDES[side]
  if mask_ratio(args, ipc) > 0 or variant == DEFAULT_VARIANT[distiller]:
    return None
  return next((s for s in sides if SIDES[s] == (distiller, DEFAULT_VARIANT[distiller], experts)),
              None)


def expert_dir(args, experts: str) -> str:
  return os.path.join(args.root, "experts", experts)


def drop_thresholds(args) -> list[str]:
  """Our drops as the official flags: `e:f` (left out from epoch e, 0-based) is a threshold of
  e - 1 (`buffer_CL.py` drops in the epochs after the one it names)."""
  drops = [(int(e), float(x)) for e, x in (item.split(":") for item in args.drops.split(","))]
  if len(drops) != 2 or drops[0][0] - 1 < args.add_end_epoch or drops[1][0] <= drops[0][0]:
    sys.exit(f"--drops {args.drops}: buffer_CL.py has two stages after the growing one: two "
             f"drops, the first after --add-end-epoch {args.add_end_epoch}")
  (e1, f1), (e2, f2) = drops
  return ["--rm-epoch-first", str(e1 - 1), "--rm-epoch-second", str(e2 - 1),
          "--rm-easy-ratio-first", str(f1), "--rm-easy-ratio-second", str(f2)]


def difficulty(args) -> str:
  """experts/difficulty.npz (once), for the official curriculum: our store's EL2N scores of the
  images our experts saw (the training split, after --train-size), with those images' places in
  the idx file (`indices`: torchvision's order, which the official side reads; tfds, ours, stores
  MNIST shuffled) and labels, sorted by place."""
  path = os.path.join(args.root, "experts", "difficulty.npz")
  if os.path.exists(path):
    return path
  from kip.data import load_dataset  # noqa: PLC0415
  from methods.experts import balanced_subset  # noqa: PLC0415

  scores = np.load(os.path.join(expert_dir(args, "ours"), "difficulty.npy"))
  train = load_dataset("mnist", val_size=0)["train"]
  images, labels = np.asarray(train.images), np.asarray(train.labels)
  keep = (balanced_subset(labels, args.train_size, args.expert_seed) if args.train_size
          else np.arange(len(labels)))
  if len(keep) != len(scores):
    sys.exit(f"{expert_dir(args, 'ours')}: {len(scores)} scores for {len(keep)} images")
  with gzip.open(os.path.join(args.mnist_raw, "train-images-idx3-ubyte.gz")) as f:
    raw = np.frombuffer(f.read()[16:], np.uint8).reshape(-1, images[0].size)
  place = {row.tobytes(): i for i, row in enumerate(raw)}
  indices = np.array([place.get(images[i].tobytes(), -1) for i in keep])
  if (indices < 0).any() or len(np.unique(indices)) != len(indices):
    sys.exit(f"{args.mnist_raw}: our training images are not one-to-one with its idx file's")
  order = np.argsort(indices)
  np.savez(path + ".tmp.npz", indices=indices[order], scores=scores[order],
           labels=labels[keep][order])
  os.replace(path + ".tmp.npz", path)
  return path


def make_experts(args, experts: str) -> dict:
  if experts == "ours":
    folder = expert_dir(args, "ours")
    marker = folder + ".json"
    if os.path.exists(marker):
      return read_json(marker)
    if args.no_distill:
      return {}
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    cmd = [sys.executable, "-m", "experiments.buffer", "--dataset", "mnist", "--preset", "cpu",
           "--curriculum", "pad", "--experts", str(args.experts), "--epochs", str(args.epochs),
           "--width", str(args.width), "--seed", str(args.expert_seed), "--train-size",
           str(args.train_size), "--init-ratio", str(args.init_ratio), "--add-end-epoch",
           str(args.add_end_epoch), "--drops", args.drops, "--score-nets", str(args.score_nets),
           "--score-steps", str(args.score_steps), "--buffer", folder, "--no-progress"]
    cpu, wall = mtt.run(cmd, folder + ".log", args.core, f"experts (ours) -> {folder}")
    record = {"side": "ours", "command": cmd, "process_cpu_s": cpu, "process_wall_s": wall,
              "core": args.core} | mtt.expert_records("ours", folder)
    write_json(marker, record)
    return record
  flags = []
  if not os.path.exists(expert_dir(args, experts) + ".json") and not args.no_distill:
    make_experts(args, "ours")  # the order comes from our experts' scores
    flags = ["--difficulty", difficulty(args), "--init-ratio", str(args.init_ratio),
             "--add-end-epoch", str(args.add_end_epoch), *drop_thresholds(args),
             *(["--no-sam"] if experts == "official_sgd" else [])]
  return datm.train_official_experts(SPEC, args, experts, *flags)


SPEC = datm.Spec(
    name="pad", title="PAD", sides=SIDES,
    default_sides="official,ours,official_depth,ours_smallest,official_depth_sgd",
    contrasts=CONTRASTS, official_py=os.path.join(HERE, "official.py"), root_flag="--pad-root",
    root_default="/work/peers/PAD",
    experts_native={"official": "official", "official_sgd": "official", "ours": "ours"},
    expert_dir=expert_dir, make_experts=make_experts, variant_flags=variant_flags,
    duplicate_of=duplicate_of)


def main(argv=None) -> None:
  datm.main(SPEC, argv, extra=add_flags, doc=__doc__)


if __name__ == "__main__":
  main()
