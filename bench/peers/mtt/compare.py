"""MTT side by side: the official code (bench/peers/mtt/official.py) and ours (`experiments.buffer`,
`experiments.mtt`).

Issue 39: at equal compute (our `cpu` presets: 4 experts of ConvNet-3 width 32 with instance norm,
6 epochs of SGD lr 0.01 on all of MNIST with DSA per image, no ZCA; then 300 iterations of 10
student steps, expert epochs 2, start epochs below 4, images lr 100, lr lr 1e-5, initial lr 0.01,
momentum 0.5, init from real images), run MTT on MNIST with both codes and evaluate every set with
the same evaluators. Equal compute for MTT includes the experts, so the sides are:

- `official`, `ours` (the headline): each side trains its own experts with its own buffer code at
  the same settings and distils from them;
- `official_on_ours`, `ours_on_official`: each distiller on the other side's experts, converted
  between the two formats (bench/peers/mtt/convert.py; the conversion is checked on every run by
  the logits of one expert on real test images, both ways). With all four, the 2 x 2 design
  separates the distillation step (same experts, other distiller) from the experts (same
  distiller, other experts).

Experts are trained once per side (shared by every ipc and seed) and pinned to `--core` with one
thread like the distillations; the sides take turns per ipc and seed. Every set is evaluated by
ours, `experiments.transfer --protocol dsa` (MTT's own evaluation: ConvNet-3, instance norm, SGD
at the set's learned lr, momentum 0.9, weight decay 5e-4, lr x0.1 at half, 1000 epochs, DSA per
image) at the experts' width (`--eval-width`, MTT's eval mode S: the distillation network), and
with `--official-eval-nets K` by the official `evaluate_synset` as well.

Runs under the project's Python and starts the official side with the PyTorch environment's
(`--torch-python`). Everything goes to `--root` (runs/ is not tracked): experts/<name>/, then
<side>/ipc<ipc>_seed<seed>/; a step whose marker exists is skipped, so the command resumes.
Writes `--out` (.json: every record; .md: the tables) and prints the tables: per side and ipc,
the mean accuracy with a 95% t-interval over all evaluation networks of all seeds
(`kip.scores.interval95`), and paired differences between sides.

    python bench/peers/mtt/compare.py --ipcs 1,10 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, REPO)  # run as a script: the repository's packages
from bench.peers.common import (  # noqa: E402
  interval,
  interval_n,
  paired_differences,
  read_json,
  run_child,
  write_json,
)
from bench.peers.dm.compare import ours_times  # noqa: E402
from methods.experts import PRESETS as BUFFER_PRESETS  # noqa: E402
from methods.experts import Config as BufferConfig  # noqa: E402
from methods.mtt import CPU_BATCH_SYN  # noqa: E402
from methods.mtt import PRESETS as MTT_PRESETS  # noqa: E402
from methods.mtt import Config as MTTConfig  # noqa: E402

BUFFER = BufferConfig(**BUFFER_PRESETS["cpu"])  # the settings of both sides (overridable)
MTT = MTTConfig(**MTT_PRESETS["cpu"])
# side: (distiller, experts)
SIDES = {"official": ("official", "official"), "ours": ("ours", "ours"),
         "official_on_ours": ("official", "ours"), "ours_on_official": ("ours", "official")}
# (a, b, what a - b measures)
CONTRASTS = (("ours", "official", "headline: ours - official, each on its own experts"),
             ("ours_on_official", "official", "distiller, official experts: ours - official"),
             ("ours", "official_on_ours", "distiller, our experts: ours - official"),
             ("official_on_ours", "official", "experts, official distiller: ours - official"),
             ("ours", "ours_on_official", "experts, our distiller: ours - official"))
LOGIT_TOLERANCE = 1e-4  # relative; float32 convolutions in two libraries agree to ~1e-6


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--ipcs", default="1,10", help="comma-separated images per class")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated distillation seeds")
  p.add_argument("--sides", default="official,ours",
                 help=f"comma-separated, among {', '.join(SIDES)}")
  g = p.add_argument_group("experts (defaults: experiments.buffer --preset cpu)")
  g.add_argument("--experts", type=int, default=BUFFER.experts)
  g.add_argument("--epochs", type=int, default=BUFFER.epochs, help="epochs per expert")
  g.add_argument("--width", type=int, default=BUFFER.width, help="ConvNet width")
  g.add_argument("--expert-seed", type=int, default=0)
  g.add_argument("--train-size", type=int, default=0,
                 help="experts train on a class-balanced subset of this many images (0: all; "
                      "smoke tests only)")
  g = p.add_argument_group("distillation (defaults: experiments.mtt --preset cpu)")
  g.add_argument("--steps", type=int, default=MTT.steps, help="iterations")
  g.add_argument("--syn-steps", type=int, default=MTT.syn_steps)
  g.add_argument("--expert-epochs", type=int, default=MTT.expert_epochs)
  g.add_argument("--max-start-epoch", type=int, default=MTT.max_start_epoch)
  g.add_argument("--lr-img", type=float, default=MTT.lr_img)
  g.add_argument("--lr-lr", type=float, default=MTT.lr_lr)
  g.add_argument("--lr-init", type=float, default=MTT.lr_init)
  g = p.add_argument_group("evaluation")
  g.add_argument("--eval-seeds", type=int, default=5, help="networks of our evaluator per set")
  g.add_argument("--eval-width", type=int, default=0,
                 help="width of our evaluator's ConvNet (0: the experts' --width)")
  g.add_argument("--eval-steps", type=int, default=0,
                 help="training steps of our evaluator (0: the dsa protocol's 1000 epochs)")
  g.add_argument("--official-eval-nets", type=int, default=0,
                 help="networks of the official evaluate_synset per set (0: skip)")
  g.add_argument("--official-eval-epochs", type=int, default=1000)
  p.add_argument("--root", default=os.path.join(REPO, "runs", "peers", "mtt"))
  p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "peers",
                                               "mtt_mnist.json"),
                 help="records (.json); the tables go beside it (.md)")
  p.add_argument("--torch-python", default="/work/venvs/torch/bin/python")
  p.add_argument("--mtt-root",
                 default=os.environ.get("MTT_ROOT", "/work/peers/mtt-distillation"))
  p.add_argument("--core", default="0",
                 help="taskset CPU list of the experts and distillations ('' for none)")
  p.add_argument("--eval-core", default="", help="taskset CPU list of the evaluations")
  p.add_argument("--no-distill", action="store_true",
                 help="no experts or distillations: evaluate and tabulate what exists")
  p.add_argument("--no-eval", action="store_true", help="experts and distillations only")
  args = p.parse_args(argv)
  if set(args.sides.split(",")) - set(SIDES):
    p.error(f"unknown side in --sides {args.sides}; choose among {', '.join(SIDES)}")
  return args


def official(args, command: str, *flags: str) -> list[str]:
  return [args.torch_python, os.path.join(HERE, "official.py"), command, "--mtt-root",
          args.mtt_root, "--width", str(args.width), "--threads", "1", *flags]


def run(cmd: list[str], log: str, core: str, what: str) -> tuple[float, float]:
  print(what, flush=True)
  cpu, wall, rc = run_child(cmd, log, core)
  if rc:
    sys.exit(f"{what} failed (exit {rc}); see {log}")
  print(f"  {wall:.0f} s wall, {cpu:.0f} CPU-s", flush=True)
  return cpu, wall


# ----------------------------------------------------------------------------- experts

def expert_dir(args, name: str) -> str:
  return os.path.join(args.root, "experts", name)


def make_experts(args, side: str) -> dict:
  """Trains `side`'s experts (once); returns the record (experts/<side>.json marks it done)."""
  marker = expert_dir(args, side) + ".json"
  if os.path.exists(marker):
    return read_json(marker)
  if args.no_distill:
    return {}
  folder = expert_dir(args, side)
  os.makedirs(os.path.dirname(folder), exist_ok=True)
  if side == "official":
    cmd = official(args, "buffer", "--experts", str(args.experts), "--epochs", str(args.epochs),
                   "--lr-teacher", str(BUFFER.lr), "--mom", str(BUFFER.momentum), "--l2",
                   str(BUFFER.weight_decay), "--batch-train", str(BUFFER.batch),
                   "--dsa-strategy", BUFFER.augment, "--seed", str(args.expert_seed),
                   "--train-size", str(args.train_size), "--out", folder)
  else:
    cmd = [sys.executable, "-m", "experiments.buffer", "--dataset", "mnist", "--preset", "cpu",
           "--experts", str(args.experts), "--epochs", str(args.epochs), "--width",
           str(args.width), "--seed", str(args.expert_seed), "--train-size",
           str(args.train_size), "--buffer", folder, "--no-progress"]
  cpu, wall = run(cmd, folder + ".log", args.core, f"experts ({side}) -> {folder}")
  record = {"side": side, "command": cmd, "process_cpu_s": cpu, "process_wall_s": wall,
            "core": args.core}
  record |= expert_records(side, folder)
  write_json(marker, record)
  return record


def expert_records(native: str, folder: str) -> dict:
  """`experts`: each expert's final test accuracy and loop seconds (and `commit`), from an
  official `buffer.json` (`native` official) or our store (ours)."""
  if native == "official":
    done = read_json(os.path.join(folder, "buffer.json"))
    return {"commit": done["commit"], "experts": [
        {"test_acc": e["final_test_acc"], "loop_s": e["train_cpu_s"], "test_cpu_s": e["test_cpu_s"]}
        for _, e in sorted(done["experts"].items(), key=lambda kv: int(kv[0]))]}
  from methods.trajectory import ExpertStore  # noqa: PLC0415

  store = ExpertStore.open(folder)
  return {"experts": [{"test_acc": store.record(i)["test_acc"],
                       "loop_s": store.record(i)["train_time"]} for i in store.experts()]}


def convert_experts(args, source: str, native: str | None = None) -> dict:
  """The other format of `source`'s experts (once): official -> our store `official_as_ours`,
  ours -> `.pt` files `ours_as_official`; checked by one expert's logits on test images.
  `native` (official or ours) is the format of experts named otherwise (DATM's, PAD's)."""
  native = native or ("official" if source == "official" else "ours")
  target = expert_dir(args, f"{source}_as_{'ours' if native == 'official' else 'official'}")
  marker = target + ".json"
  if os.path.exists(marker):
    return read_json(marker)
  if args.no_distill or not os.path.exists(expert_dir(args, source) + ".json"):
    return {}
  from bench.peers.mtt import convert  # noqa: PLC0415
  from methods.trajectory import ExpertStore  # noqa: PLC0415

  log = target + ".log"
  logits = target + "_logits.npz"
  if native == "official":
    settings = {"dataset": "mnist", "preprocess": BUFFER.preprocess, "width": args.width,
                "depth": 0, "norm": BUFFER.norm, "converted_from": expert_dir(args, source),
                "official_settings": read_json(os.path.join(expert_dir(args, source),
                                                            "buffer.json"))["settings"]}
    store = convert.official_to_store(expert_dir(args, source), target, settings)
    run(official(args, "logits", "--buffer", expert_dir(args, source), "--out", logits), log, "",
        "logits of official expert 0")
  else:
    npz = target + ".npz"
    convert.store_to_npz(expert_dir(args, source), npz)
    run(official(args, "import-buffer", "--npz", npz, "--out", target), log, "",
        f"our experts -> {target}")
    run(official(args, "logits", "--buffer", target, "--out", logits), log, "",
        "logits of our expert 0 in the official network")
    store = ExpertStore.open(expert_dir(args, source))
  error = convert.check_logits(logits, np.asarray(store.trajectory(store.experts()[0])[-1]),
                               store.settings)
  if not error < LOGIT_TOLERANCE:
    sys.exit(f"conversion {source} -> {target}: the logits differ by {error:.2e} (relative); "
             "the layouts do not match")
  record = {"source": source, "target": target, "logits_rel_error": error}
  write_json(marker, record)
  print(f"converted {source} -> {target}; logits agree to {error:.1e}", flush=True)
  return record


def buffer_of(args, side: str) -> str:
  """The experts `side`'s distiller reads, in its own format."""
  distiller, experts = SIDES[side]
  return expert_dir(args, experts if distiller == experts else f"{experts}_as_{distiller}")


# ----------------------------------------------------------------------------- distillation

def batch_syn(ipc: int) -> int:
  """Our cpu preset's student minibatch (all images, at most CPU_BATCH_SYN), for both sides."""
  return min(10 * ipc, CPU_BATCH_SYN)


def steady_cpu_per_step(side: str, folder: str, distiller: str | None = None) -> float | None:
  """CPU seconds per iteration over the run's second half (no compilation, no evaluation);
  `distiller` (official or ours) for a side that is not one of SIDES (DATM's, PAD's)."""
  if (distiller or SIDES[side][0]) == "official":
    cpu = read_json(os.path.join(folder, "official.json"))["cpu_s"]
    half = len(cpu) // 2
    return (cpu[-1] - cpu[half - 1]) / (len(cpu) - half) if half else None
  steps = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))
           if '"cpu_time"' in line and '"finite_' not in line]
  half = [r for r in steps if r["step"] > steps[-1]["step"] // 2]
  if len(half) < 2:
    return None
  return (half[-1]["cpu_time"] - half[0]["cpu_time"]) / (half[-1]["step"] - half[0]["step"])


def distill(args, side: str, ipc: int, seed: int, folder: str) -> None:
  """One distillation into `folder`; `folder/run.json` marks it done."""
  marker = os.path.join(folder, "run.json")
  if os.path.exists(marker):
    return
  os.makedirs(folder, exist_ok=True)
  common = ["--ipc", str(ipc), "--seed", str(seed), "--syn-steps", str(args.syn_steps),
            "--expert-epochs", str(args.expert_epochs), "--max-start-epoch",
            str(args.max_start_epoch), "--batch-syn", str(batch_syn(ipc)), "--lr-img",
            str(args.lr_img), "--lr-lr", str(args.lr_lr)]
  if SIDES[side][0] == "official":
    cmd = official(args, "distill", "--buffer", buffer_of(args, side), *common, "--iterations",
                   str(args.steps), "--lr-teacher", str(args.lr_init), "--out", folder)
  else:
    cmd = [sys.executable, "-m", "experiments.mtt", "--dataset", "mnist", "--preset", "cpu",
           "--buffer", buffer_of(args, side), *common, "--steps", str(args.steps), "--lr-init",
           str(args.lr_init), "--eval-every", "0", "--no-progress", "--workdir", folder]
  cpu, wall = run(cmd, os.path.join(folder, "distill.log"), args.core,
                  f"distil {side} ipc {ipc} seed {seed} -> {folder}")
  record = {"side": side, "ipc": ipc, "seed": seed, "command": cmd, "process_cpu_s": cpu,
            "process_wall_s": wall, "core": args.core}
  if SIDES[side][0] == "official":
    done = read_json(os.path.join(folder, "official.json"))
    record |= {"distill_cpu_s": done["distill_cpu_s"], "distill_wall_s": done["distill_wall_s"],
               "commit": done["commit"], "lr": done["syn_lr"][-1]}
  else:
    record |= ours_times(folder)
    with np.load(os.path.join(folder, "distilled.npz")) as f:
      record["lr"] = float(f["extra_lr"])
  record["steady_cpu_s_per_step"] = steady_cpu_per_step(side, folder)
  write_json(marker, record)


# ----------------------------------------------------------------------------- evaluation

def support_path(side: str, folder: str) -> str:
  if SIDES[side][0] == "official":
    return os.path.join(folder, "images_mtt_official.npy")
  return os.path.join(folder, "distilled.npz")


def eval_lr(record: dict) -> float:
  """The evaluators' learning rate: the set's learned one, or where that is not positive (a
  diverged learning rate) both evaluators' default 0.01 (torch's SGD refuses a negative rate;
  `experiments.transfer` would silently use its protocol's 0.01)."""
  return record["lr"] if record["lr"] > 0 else 0.01


def evaluate_ours(args, side: str, folder: str, lr: float, support: str | None = None
                  ) -> tuple[list[float], dict]:
  """Accuracies of `--eval-seeds` networks trained by `experiments.transfer --protocol dsa` at
  `lr` on `support` (default: the side's set in `folder`)."""
  workdir = os.path.join(folder, "eval_dsa")
  report = os.path.join(workdir, "transfer.json")
  if not os.path.exists(report):
    support = support or support_path(side, folder)
    cmd = [sys.executable, "-m", "experiments.transfer", "--support", support,
           "--dataset", "mnist", "--protocol", "dsa", "--seeds", str(args.eval_seeds),
           "--baselines", "none", "--width", str(args.eval_width or args.width), "--steps",
           str(args.eval_steps), "--lr", repr(lr), "--eval-every", "100000", "--no-progress",
           "--workdir", workdir]
    run(cmd, os.path.join(folder, "eval_dsa.log"), args.eval_core, f"evaluate (ours, dsa) {folder}")
  row = read_json(report)["rows"][0]
  return row["test_acc"], {k: row[k] for k in ("net", "width", "norm", "protocol", "steps", "lr",
                                                "train_time")}


def dc_pair(folder: str) -> str:
  """Our set as an images/labels/lr .npy triple in DC's space (NCHW), for evaluate_synset."""
  from kip.io import load_distilled  # noqa: PLC0415
  from kip.readers import DC_STATS  # noqa: PLC0415

  d = load_distilled(os.path.join(folder, "distilled.npz"), "mnist")
  (dc_mean,), (dc_std,) = DC_STATS["mnist"]
  pixels = d.images * np.asarray(d.preprocessor.std) + np.asarray(d.preprocessor.mean)
  path = os.path.join(folder, "images_mtt_ours_dcspace.npy")
  np.save(path, ((pixels - dc_mean) / dc_std).transpose(0, 3, 1, 2).astype(np.float32))
  np.save(path.replace("images_", "labels_"), d.labels.argmax(-1).astype(np.int64))
  np.save(path.replace("images_", "lr_"), np.asarray(d.extras["lr"], np.float32))
  return path


def evaluate_official(args, side: str, folder: str, lr: float) -> list[float]:
  """Accuracies of `--official-eval-nets` networks of the official evaluate_synset at `lr`."""
  path = os.path.join(folder, "eval_official.json")
  if not os.path.exists(path):
    support = (support_path(side, folder) if SIDES[side][0] == "official" else dc_pair(folder))
    log = os.path.join(folder, "eval_official.log")
    cmd = official(args, "evaluate", "--support", support, "--nets",
                   str(args.official_eval_nets), "--eval-epochs", str(args.official_eval_epochs),
                   "--lr", repr(lr))
    cpu, wall = run(cmd, log, args.eval_core, f"evaluate (official evaluate_synset) {folder}")
    last = [line for line in open(log) if line.startswith('{"support"')][-1]
    write_json(path, json.loads(last) | {"process_cpu_s": cpu, "process_wall_s": wall})
  return read_json(path)["accs"]


# ----------------------------------------------------------------------------- tables

def expert_table(experts: dict) -> str:
  from kip.cli import format_table  # noqa: PLC0415

  rows = []
  for side, record in experts.items():
    if not record.get("experts"):
      continue
    es = record["experts"]
    rows.append((side, str(len(es)), f"{interval([e['test_acc'] for e in es])}",
                 f"{np.mean([e['loop_s'] for e in es]):.0f}",
                 f"{record['process_cpu_s'] / len(es):.0f}"))
  return format_table(("experts", "n", "final test acc %: mean [95% t]",
                       "loop s / expert (official: CPU, ours: wall)",
                       "command CPU-s / expert"), rows)


def table(records: list[dict]) -> str:
  from kip.cli import format_table  # noqa: PLC0415

  rows = []
  for ipc in sorted({r["ipc"] for r in records}):
    for side in SIDES:
      rs = [r for r in records if r["side"] == side and r["ipc"] == ipc]
      if not rs:
        continue
      ours_eval = [a for r in rs for a in r.get("acc_ours_dsa", [])]
      official_eval = [a for r in rs for a in r.get("acc_official", [])]
      steady = [r["steady_cpu_s_per_step"] for r in rs if r.get("steady_cpu_s_per_step")]
      cpu = [r["distill_cpu_s"] for r in rs if "distill_cpu_s" in r]
      rows.append((side, *SIDES[side], str(ipc), ",".join(str(r["seed"]) for r in rs),
                   f"{interval(ours_eval)} (n={len(ours_eval)})",
                   f"{interval(official_eval)} (n={len(official_eval)})" if official_eval else "-",
                   ", ".join(f"{r['lr']:.4f}" for r in rs),
                   f"{np.mean(cpu):.0f}" if cpu else "-",
                   f"{np.mean(steady):.2f}" if steady else "-"))
  return format_table(("side", "distiller", "experts", "ipc", "seeds",
                       "acc %, ours dsa eval: mean [95% t]", "acc %, official eval",
                       "learned lr", "distill CPU-s", "steady CPU-s / iteration"), rows)


def paired(records: list[dict]) -> str:
  """a - b per (ipc, seed, evaluation network) for each contrast of CONTRASTS
  (`common.paired_differences`), under each evaluator."""
  from kip.cli import format_table  # noqa: PLC0415

  rows = [(name, what, str(ipc), ",".join(seeds), interval_n(diffs))
          for key, name in (("acc_ours_dsa", "ours dsa eval"), ("acc_official", "official eval"))
          for a, b, what in CONTRASTS
          for ipc, seeds, diffs in paired_differences(records, a, b, key)]
  return format_table(("evaluator", "contrast", "ipc", "seeds", "difference, points: mean [95% t]"),
                      rows)


def main(argv=None) -> None:
  args = parse_args(argv)
  ipcs = [int(v) for v in args.ipcs.split(",")]
  seeds = [int(v) for v in args.seeds.split(",")]
  sides = args.sides.split(",")
  needed = {SIDES[side][1] for side in sides}
  experts = {name: make_experts(args, name) for name in ("official", "ours") if name in needed}
  conversions = {}
  for side in sides:
    distiller, source = SIDES[side]
    if distiller != source and source not in conversions:
      conversions[source] = convert_experts(args, source)
  records = []
  for seed in seeds:
    for ipc in ipcs:
      for side in sides:
        folder = os.path.join(args.root, side, f"ipc{ipc}_seed{seed}")
        if not args.no_distill and os.path.exists(buffer_of(args, side) + ".json"):
          distill(args, side, ipc, seed, folder)
        marker = os.path.join(folder, "run.json")
        if not os.path.exists(marker):
          continue
        record = read_json(marker)
        record["eval_lr"] = lr = eval_lr(record)
        if not args.no_eval or os.path.exists(os.path.join(folder, "eval_dsa", "transfer.json")):
          record["acc_ours_dsa"], record["eval_ours_dsa"] = evaluate_ours(args, side, folder, lr)
        if ((args.official_eval_nets and not args.no_eval)
            or os.path.exists(os.path.join(folder, "eval_official.json"))):
          record["acc_official"] = evaluate_official(args, side, folder, lr)
        records.append(record)
        write_json(args.out, {"settings": vars(args), "experts": experts,
                              "conversions": conversions, "runs": records})
  tables = [expert_table(experts), table(records), paired(records)]
  print("\n\n".join(tables))
  md = os.path.splitext(args.out)[0] + ".md"
  with open(md + ".tmp", "w") as f:
    f.write("# MTT on MNIST: the official code beside ours (issue 39)\n\nTables written by "
            "`python bench/peers/mtt/compare.py " + shlex.join(argv or sys.argv[1:]) + "` "
            "(settings and differences: bench/peers/README.md, MTT section; records: "
            f"{os.path.basename(args.out)}).\n\n"
            + "\n\n".join(f"```\n{t}\n```" for t in tables) + "\n")
  os.replace(md + ".tmp", md)
  print(f"written {args.out} and {md}")


if __name__ == "__main__":
  main()
