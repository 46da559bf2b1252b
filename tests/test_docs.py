"""The user-facing examples leave the checkout as it was: every `python -m experiments.*` command
of the README and of docs/usage.md (fenced or inline), and the fenced examples of docs/results.md,
writes only under runs/ (or a placeholder the reader fills in). Regenerating tracked files is its
own named command (`make results`); the commands recorded beside committed figures in other pages
say how those files were made and are not examples."""

import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Flags whose value is a path the command writes to.
WRITES = ("--out", "--workdir", "--root", "--archive", "--readme", "--projection", "--slurm",
          "--buffer", "--cache")


def commands(text: str, inline: bool = True) -> list[str]:
  """The `python -m experiments.<job> ...` commands of a markdown text: fenced lines (backslash
  continuations joined, comments dropped) and, with `inline`, `...` spans."""
  found = []
  for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      match = re.search(r"python -m experiments\.\w+.*", line)
      if match:
        found.append(match.group(0))
  if inline:
    found += re.findall(r"`(python -m experiments\.[^`]*)`", re.sub(r"```.*?```", "", text,
                                                                     flags=re.S))
  return found


def written_paths(command: str) -> list[str]:
  words = shlex.split(command, comments=True)
  paths = [value for flag, value in zip(words, words[1:], strict=False) if flag in WRITES]
  paths += [word.split("=", 1)[1] for word in words if word.split("=", 1)[0] in WRITES
            and "=" in word]
  return paths


def _placeholder(path: str) -> bool:
  return bool(re.fullmatch(r"[A-Z][A-Z_]*(/.*)?|\$\w+.*|<[^>]+>.*", path))


def test_the_parser_finds_what_an_example_writes():
  text = ("```bash\npython -m experiments.show a.npz --out curve.png  # a comment --out x\n"
          "python -m experiments.kip \\\n    --workdir runs/k\n```\nand `python -m "
          "experiments.benchmark --readme=README.md` inline")
  assert [p for c in commands(text) for p in written_paths(c)] == [
      "curve.png", "runs/k", "README.md"]
  assert _placeholder("DIR") and _placeholder("W") and not _placeholder("docs/results.md")


@pytest.mark.parametrize("page,inline", [("README.md", True), ("docs/usage.md", True),
                                         ("docs/results.md", False)])
def test_examples_write_only_under_runs(page, inline):
  found = commands((ROOT / page).read_text(), inline)
  assert found, f"no example found in {page}"
  outside = [(c, p) for c in found for p in written_paths(c)
             if not (p.startswith("runs/") or _placeholder(p))]
  assert not outside, outside
