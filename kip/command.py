"""A job's command line generated from its description: the module `experiments.<job>` is
`main = main_for(JOB, __doc__)` and nothing else.

A `Job` names what the command needs and lives beside the method (in `methods/`) or the tool it
runs: its config dataclass (every flag, its default and help, once), its presets, the workdir's
folder name, the input files whose content a resume must not change, and `run(config, workdir,
devices) -> lines to report`. `main_for` parses the flags (`kip.cli.parse_config`), starts the
devices for jobs whose config has the device flags, creates or checks the workdir
(`kip.cli.prepare_workdir`: a run with other settings in the same folder is refused), logs where
it runs, calls `run` and prints its report; `kip.cli.run_main` turns user errors into one line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from kip import cli

__all__ = ["Job", "Devices", "main_for"]


class Devices(NamedTuple):
  """The mesh of every device and the per-device memory budget of kernel tiles (bytes), for
  jobs whose config has `cli.DeviceConfig`'s flags; (None, None) otherwise."""

  mesh: Any = None
  memory_bytes: float | None = None


class Job(NamedTuple):
  """What `main_for` needs to make a command.

  name: the job's name (the default workdir's prefix, the log's label); config: its frozen config
  dataclass; run: (config, workdir, devices) -> report lines; presets: name -> {field: value}
  (with a `preset` field in the config); folder: config -> the default workdir's name parts;
  inputs: config -> {name: path} of input files recorded by digest; check: config -> None, run
  before the workdir is made (reading a given file, so a bad one leaves nothing behind); workdir:
  False for jobs that write no run folder (they get workdir ''); positional: config fields taken
  as positional arguments rather than flags."""

  name: str
  config: type
  run: Callable[[Any, str, Devices], Sequence[str]]
  presets: dict[str, dict] | None = None
  folder: Callable[[Any], Sequence[str]] = lambda config: [config.dataset]
  inputs: Callable[[Any], dict[str, str]] | None = None
  check: Callable[[Any], None] | None = None
  workdir: bool = True
  positional: Sequence[str] = ()
  ignore: Sequence[str] = (*cli.NOT_SETTINGS, "steps", "eval_every")
  default_workdir: Callable[[Any], str] | None = None


def main_for(job: Job, doc: str) -> Callable[[Sequence[str] | None], int]:
  """The `main(argv)` of `job`'s command, with `doc` (the command module's docstring) as its
  --help description."""

  def main(argv: Sequence[str] | None = None) -> int:
    config = cli.parse_config(job.config, argv, doc, positional=job.positional,
                              presets=job.presets)
    if job.default_workdir is not None and not config.workdir:
      config = dataclasses.replace(config, workdir=job.default_workdir(config))
    if job.check is not None:
      job.check(config)
    devices = Devices()
    if isinstance(config, cli.DeviceConfig):
      devices = Devices(*cli.setup_devices(config))
    workdir = ""
    if job.workdir:
      workdir = cli.prepare_workdir(config, job.name, job.folder(config), ignore=job.ignore,
                                    inputs=job.inputs(config) if job.inputs else None)
      preset = f"; preset {config.preset}" if getattr(config, "preset", None) else ""
      if devices.memory_bytes is not None:
        cli.log_devices(devices.memory_bytes, workdir)
      else:
        cli.log(f"devices: {cli.describe_devices()}{preset}; workdir: {workdir}")
    for line in job.run(config, workdir, devices):
      cli.report(line)
    return 0

  return main
