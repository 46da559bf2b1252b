"""The layout rule of DESIGN.md, checked on the source: `kip/` is the core and names no method in
its code, imports nothing of `methods/` or `experiments/`, and has no import circle.

Method names may appear in docstrings and comments (they cite where an idea comes from); they may
not appear in identifiers or string constants, where they would be registry keys, flag values,
dispatch or fields that exist for one method. Adding a method is then a file in `methods/` and a
command, never an edit of `kip/`.
"""

import ast
import pathlib
import re

import pytest

KIP = pathlib.Path(__file__).resolve().parents[1] / "kip"
MODULES = sorted(KIP.glob("*.py"))

# The distillers and protocols of methods/, as words (an identifier or string is split into words
# at non-alphanumerics, underscores and lower-to-upper case changes).
METHOD_NAMES = ("kip", "label_solve", "frepo", "rfad", "krr_st", "krrst", "barlow", "datadam",
                "dm", "mtt", "datm", "pad", "autoencoder", "report")

# Words that are a method's name and also an ordinary word or the package's own name, allowed
# where they mean the latter. Each entry: the whole identifier or string word-group (a run of
# letters, digits and underscores) as it is written, and why it is no method's name there.
ALLOWED_IDENTIFIERS = {
    "kip": "the package itself (`import kip`, `module 'kip'`)",
    "pad": "padding: `jnp.pad`, a crop's pad width (not the PAD method)",
    "_pad_rows": "padding rows to a tile (kip/sharding.py), not the PAD method",
    "report": "`kip.cli.report`, which prints a command's result (not the report protocol)",
}
ALLOWED_STRINGS = {
    "kip": "the package's name, the same word as KIP's, so a lone `kip` (any case) is allowed: "
           "module paths (`kip.io`), `module 'kip'`, the `kip` evaluation protocol "
           "(kip/train.py, the KIP authors' finite-network transfer, kept among the common "
           "evaluations with `dc` and `dsa`), the folder of the KIP authors' released sets "
           "(`kip/<dataset>/...npz`, kip/io.py); joined to other words it is checked (`kip_zca`, "
           "`make_kip`)",
    "KIP_MANUAL_DIR": "the package's environment variable (kip/data.py)",
    "KIP_DATA_DIR": "the package's environment variable (kip/data.py)",
    "KIP_MALLOC": "the package's environment variable (kip/_malloc.py)",
    "kip_arrays": "the package's cache file of decoded splits, `kip_arrays.npz` (kip/data.py)",
}


def _method_names_in(text: str, allowed: dict[str, str]) -> list[str]:
  """The method names in `text` as whole words (`KRR-ST`, `krr_st_convnet`, `BarlowTwins`), but
  for the allowed word-groups (runs of letters, digits and underscores)."""
  plain, split = [], []  # words of the whole text; None where an allowed group was
  for group in re.findall(r"[A-Za-z0-9_]+", text):
    if group in allowed or group.lower() in allowed:
      plain.append(None)
      split.append(None)
      continue
    plain += [w.lower() for w in group.split("_") if w]
    split += [w.lower() for w in re.split(r"_+|(?<=[a-z0-9])(?=[A-Z])", group) if w]
  found = []
  for name in METHOD_NAMES:
    parts = name.split("_")
    if any(words[i:i + len(parts)] == parts for words in (plain, split)
           for i in range(len(words))):
      found.append(name)
  return found


def _docstrings(tree: ast.AST) -> set[int]:
  ids = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
          and isinstance(body[0].value.value, str):
        ids.add(id(body[0].value))
  return ids


def _all_entries(tree: ast.Module) -> set[int]:
  """The string constants of `__all__`: names of the module's identifiers."""
  ids = set()
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
      ids |= {id(c) for c in ast.walk(node.value) if isinstance(c, ast.Constant)}
  return ids


def method_names_in_code(path: pathlib.Path) -> list[str]:
  """`path:line: kind 'text' names method` for every identifier and string constant (not
  docstrings, not comments, not the module paths of imports) that holds a method's name."""
  tree = ast.parse(path.read_text(), str(path))
  docstrings, all_entries = _docstrings(tree), _all_entries(tree)
  found = []

  def check(node, text, kind):
    allowed = ALLOWED_STRINGS if kind == "string" else ALLOWED_IDENTIFIERS
    for name in _method_names_in(text, allowed):
      found.append(f"{path.name}:{getattr(node, 'lineno', '?')}: {kind} {text[:70]!r} names "
                   f"{name}")

  for node in ast.walk(tree):
    if isinstance(node, ast.Name):
      check(node, node.id, "identifier")
    elif isinstance(node, ast.Attribute):
      check(node, node.attr, "identifier")
    elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
      check(node, node.name, "identifier")
    elif isinstance(node, ast.arg):
      check(node, node.arg, "identifier")
    elif isinstance(node, ast.keyword) and node.arg:
      check(node, node.arg, "identifier")
    elif isinstance(node, ast.alias):
      check(node, node.asname or node.name.rpartition(".")[2], "identifier")
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
      if id(node) in all_entries:
        check(node, node.value, "identifier")
      elif id(node) not in docstrings:
        check(node, node.value, "string")
  return found


def test_the_word_splitting_finds_method_names_and_spares_ordinary_words():
  assert _method_names_in("frepo_convnet", {}) == ["frepo"]
  assert _method_names_in("nfk-krr_st_convnet", {}) == ["krr_st"]
  assert _method_names_in("the KRR-ST code's rule", {}) == ["krr_st"]
  assert _method_names_in("BarlowTwins", {}) == ["barlow"]
  assert _method_names_in("FRePo's ConvNet", {}) == ["frepo"]
  assert _method_names_in("kip_zca", ALLOWED_STRINGS) == ["kip"]
  assert _method_names_in("the report's 50 epochs", {}) == ["report"]
  assert _method_names_in("padding", {}) == []  # whole words only
  assert _method_names_in("module 'kip' has no attribute", ALLOWED_STRINGS) == []
  assert _method_names_in("dsa_strategy dc_padding zca", {}) == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_kip_names_no_method_in_code(path):
  found = method_names_in_code(path)
  assert not found, ("kip/ is the core and names no method in code; move the method's part to "
                     "methods/ (or name what it does):\n" + "\n".join(found))


def _imports(path: pathlib.Path) -> set[str]:
  """The modules `path` imports, at module level or inside functions, as dotted names."""
  imported = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      imported |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      imported.add(node.module)
      # `from kip import cli` imports the module kip.cli.
      imported |= {f"{node.module}.{alias.name}" for alias in node.names
                   if (KIP.parent / node.module.replace(".", "/") / f"{alias.name}.py").exists()}
  return imported


def _graph() -> dict[str, set[str]]:
  names = {f"kip.{p.stem}" if p.stem != "__init__" else "kip": p for p in MODULES}
  return {name: {m for m in _imports(path) if m in names and m != name}
          for name, path in names.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One circle through each strongly connected component of more than one module."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return components


def test_the_cycle_finder_finds_circles():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_kip_has_no_import_circle():
  cycles = _cycles(_graph())
  assert not cycles, ("modules of kip/ import each other in a circle (imports inside functions "
                      "count): " + "; ".join(" <-> ".join(c) for c in cycles))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_kip_imports_nothing_above_it(path):
  above = sorted(m for m in _imports(path) if m.split(".")[0] in ("methods", "experiments"))
  assert not above, f"kip/{path.name} imports {', '.join(above)}: dependencies point one way, " \
                    "experiments -> methods -> kip"


# The command-line layer: flags generated from configs, workdirs, one-line errors, `main`s.
COMMAND_LINE = ("cli", "command")


@pytest.mark.parametrize("path", [p for p in MODULES if p.stem not in (*COMMAND_LINE, "__init__")],
                         ids=lambda p: p.name)
def test_the_library_does_not_depend_on_the_command_line(path):
  layer = {f"kip.{name}" for name in COMMAND_LINE}
  assert not layer & _imports(path), (
      f"kip/{path.name} imports {', '.join(sorted(layer & _imports(path)))}: the command line "
      "sits on top of the library (data, pipeline, training...); what the library needs belongs "
      "below it")
