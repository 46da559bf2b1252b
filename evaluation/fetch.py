"""The KIP authors' released sets, fetched by name into a cache (`experiments.fetch`'s job).

Nguyen et al. published their KIP and Label Solve sets (ICLR 2021; NeurIPS 2021) in the public
Google Cloud Storage bucket `kip-datasets`, listed by the authors' `kip/dataset.ipynb` (their
`kip/kip.csv` and `ls/ls.csv` hold every file's URL):

  https://storage.googleapis.com/kip-datasets/kip/<dataset>/<Arch>_ssize<N>_<zca|nozca>_<l|nol>_<aug|noaug>_ckpt<K>.npz
  https://storage.googleapis.com/kip-datasets/ls/<dataset>/<Arch>_ssize<N>_<zca|nozca>.npz

A name is that path under the bucket (`kip/mnist/ConvNet_ssize100_zca_l_noaug_ckpt1000.npz`). The
file is kept under the cache folder by the same path (never beside the code: a relative `kip/...`
would sit in this project's `kip/` package), checked by reading it as a released set, and its path
printed, so `--support "$(python -m experiments.fetch NAME)"` works.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request

from kip import cli
from kip.command import Job
from kip.data import unreachable_host
from kip.io import load_distilled, parse_release_name
from kip.readers import FileFormatError

__all__ = ["Config", "JOB", "fetch", "release_url", "BUCKET_URL", "BUCKET_ENV", "CACHE_ENV"]

BUCKET_URL = "https://storage.googleapis.com/kip-datasets"
BUCKET_ENV = "KIP_RELEASES_URL"  # a mirror of the bucket (the tests: a local folder, file://)
CACHE_ENV = "KIP_CACHE"
f = cli.field


@dataclasses.dataclass(frozen=True)
class Config:
  name: str = f("", "the set's path in the bucket, e.g. "
                    "kip/mnist/ConvNet_ssize100_zca_l_noaug_ckpt1000.npz")
  cache: str = f("", f"where fetched sets are kept (default: ${CACHE_ENV}, else "
                     "~/.cache/kip-jax; the file goes to <cache>/releases/<name>)")


def release_url(name: str) -> str:
  return f"{os.environ.get(BUCKET_ENV) or BUCKET_URL}/{name}"


def _check_name(name: str) -> None:
  info = parse_release_name(name)
  parts = name.split("/")
  if (info is None or len(parts) != 3 or parts[0] not in ("kip", "ls")
      or info.dataset != parts[1] or not name.endswith(".npz")):
    raise cli.UserError(
        f"{name!r} is not a released set's name: kip/<dataset>/<Arch>_ssize<N>_<zca|nozca>_"
        "<l|nol>_<aug|noaug>_ckpt<K>.npz or ls/<dataset>/<Arch>_ssize<N>_<zca|nozca>.npz, as "
        "the authors' kip.csv and ls.csv list them")


STALE_S = 3600  # a download's folder untouched this long belongs to a killed fetch


def sweep_stale(folder: str, max_age_s: float = STALE_S) -> None:
  """Removes the temporary folders of downloads killed before they could clean up (SIGKILL):
  those untouched for `max_age_s`, so a download still running beside this one is left alone."""
  now = time.time()
  for entry in os.scandir(folder):
    if entry.name.startswith(".fetch-") and entry.is_dir(follow_symlinks=False):
      try:
        if now - entry.stat(follow_symlinks=False).st_mtime > max_age_s:
          shutil.rmtree(entry.path, ignore_errors=True)
      except OSError:
        pass  # gone already


def fetch(name: str, cache: str = "") -> str:
  """The local path of the released set `name`, downloaded first when it is not in the cache."""
  _check_name(name)
  cache = cache or os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "kip-jax")
  path = os.path.join(os.path.expanduser(cache), "releases", *name.split("/"))
  if os.path.exists(path):
    return path
  url = release_url(name)
  offline = url.startswith(("http://", "https://")) and unreachable_host([url])
  if offline:
    raise cli.UserError(f"cannot reach {offline} to download {url}; offline, download it "
                        f"elsewhere and put it at {path}")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  sweep_stale(os.path.dirname(path))
  cli.log(f"downloading {url}")
  # Into a temporary folder beside the cache entry, under the file's own name (its preprocessing
  # is read from the name), checked, then moved: only a complete, readable file takes the name.
  with tempfile.TemporaryDirectory(dir=os.path.dirname(path), prefix=".fetch-") as folder:
    part = os.path.join(folder, os.path.basename(path))
    try:
      with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
        shutil.copyfileobj(response, out)
      load_distilled(part, name.split("/")[1])
    except (urllib.error.URLError, http.client.HTTPException, OSError, FileFormatError) as e:
      reason = str(getattr(e, "reason", None) or e).replace(part, "the file")
      raise cli.UserError(f"could not fetch {url}: {reason}") from e
    os.replace(part, path)
  return path


def run(config: Config, workdir: str, devices) -> list[str]:
  del workdir, devices
  if not config.name:
    raise cli.UserError("give a released set's name, e.g. "
                        "kip/mnist/ConvNet_ssize100_zca_l_noaug_ckpt1000.npz")
  return [fetch(config.name, config.cache)]


JOB = Job("fetch", Config, run, workdir=False, positional=("name",))
