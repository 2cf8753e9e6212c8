"""The layout rules of the package, checked on the source: imports flow one way, functions stay
small enough to read, the user-facing folders hold what they say."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dlr"
MAX_LINES, MAX_POSITIONAL = 60, 6


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        if "assets" in path.parts:
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """dlr modules `name` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_cycle():
    g = graph()
    # A package's __init__ re-exporting its modules is a face, not a dependency of them.
    edges = {m: {t for t in ts if not (m.startswith(t + ".") and (PACKAGE.parent / t.replace(".", "/") / "__init__.py").exists())}
             for m, ts in g.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in edges[m]:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in edges:
        if m not in state:
            visit(m, [m])


def test_layers_import_downwards_only():
    g = graph()
    for m, targets in g.items():
        if m.startswith("dlr.config"):
            assert targets <= {t for t in g if t.startswith("dlr.config")} | {"dlr.errors", "dlr"}, (m, targets)
        if m.startswith("dlr.hf"):
            assert all(t.startswith("dlr.hf") for t in targets), (m, targets)
        if not m.startswith("dlr.cli"):
            assert not any(t.startswith("dlr.cli") for t in targets), (m, "imports the CLI")


def test_functions_are_short_with_few_positional_parameters():
    too_long, too_many = [], []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                # ctx: an autograd Function's context, passed like self.
                positional = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls", "ctx")]
                if lines > MAX_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
                if len(positional) > MAX_POSITIONAL:
                    too_many.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({len(positional)})")
    assert not too_long, too_long
    assert not too_many, too_many


def test_scripts_holds_only_user_tools():
    files = [p for p in (ROOT / "scripts").iterdir() if p.is_file()]
    assert len(files) <= 6, sorted(p.name for p in files)


def test_choice_tuples_are_declared_once():
    """The accepted values of a choice live in dlr/config/choices.py (methods and optimizers in
    their registries); everywhere else, in the library and around it, they are imported."""
    import dlr.config.choices as choices

    declared = {name: tuple(v) for name, v in vars(choices).items() if isinstance(v, (tuple, dict)) and len(v) > 1}
    again = []
    for folder in ("dlr", "benchmarks", "experiments", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == PACKAGE / "config" / "choices.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and all(isinstance(e, ast.Constant) for e in node.elts):
                    values = tuple(e.value for e in node.elts)
                    again += [f"{path.relative_to(ROOT)}:{node.lineno} {name}" for name, v in declared.items()
                              if len(values) > 1 and set(values) == set(v)]
    assert not again, again


def test_the_package_shows_its_parts():
    """A handful of modules loose in dlr/, the rest in packages named for their job; no two modules
    share a name outside dlr/cli/ (whose modules are named for the command they run); nothing in the
    library reaches into the repository's experiments/, benchmarks/ or scripts/."""
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= 6, loose
    names = [p.name for p in PACKAGE.rglob("*.py")
             if "assets" not in p.parts and "cli" not in p.parts and p.name != "__init__.py"]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
    for path in PACKAGE.rglob("*.py"):
        if "assets" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.split(".")[0] in ("experiments", "benchmarks", "scripts") for m in mods), path


def test_the_data_and_eval_packages_name_the_process_not_a_rank():
    """In a low-rank project `rank` is the factorization's: the process sharing the data is
    `process_index` of `num_processes` (accelerate's names) in dlr/data and dlr/eval."""
    found = []
    for folder in ("data", "eval"):
        for path in (PACKAGE / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    a = node.args
                    params = a.posonlyargs + a.args + a.kwonlyargs + [p for p in (a.vararg, a.kwarg) if p]
                    found += [f"{path.relative_to(ROOT)}:{node.lineno} {p.arg}" for p in params
                              if p.arg in ("rank", "world_size")]
    assert not found, found


TYPED_ROOTS = {"cfg", "settings", "config"}  # the names the typed settings go by (dlr.config dataclasses)
CASTS = {"int", "float", "str", "bool"}


def recasts(source: str) -> list[tuple[int, str]]:
    """(line, text) of every int/float/str/bool applied directly to an attribute chain through a
    typed settings object: `int(cfg.schedule.steps)`, `str(state.cfg.checkpoint.out_dir)`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in CASTS
                and len(node.args) == 1 and isinstance(node.args[0], ast.Attribute)):
            continue
        names, part = [], node.args[0]
        while isinstance(part, ast.Attribute):
            names.append(part.attr)
            part = part.value
        if isinstance(part, ast.Name) and TYPED_ROOTS & {part.id, *names[1:]}:
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_typed_settings_are_never_cast_again():
    """A setting is typed and checked where it is declared (dlr/config/), a number given to a
    float setting arrives as a float: the trainer and the commands read it as it is."""
    assert recasts("n = int(cfg.schedule.steps)\nout = str(state.cfg.checkpoint.out_dir)\nok = int(x.y)\n"
                   "also = float(cfg.lr * 2)\n") == [(1, "int(cfg.schedule.steps)"),
                                                     (2, "str(state.cfg.checkpoint.out_dir)")]
    files = [p for p in PACKAGE.rglob("*.py") if "assets" not in p.parts]
    found = [f"{path.relative_to(ROOT)}:{line} {text}" for path in files for line, text in recasts(path.read_text())]
    assert not found, found


HF = PACKAGE / "hf"
HF_CLASSES = ("DlrLlamaForCausalLM", "DlrLlamaModel", "DlrLlamaConfig", "LowRankLinear")


def hf_class_attributes() -> set[str]:
    """Names the shipped model classes (dlr/hf/) declare in their class bodies: attributes and
    methods. Not the config's fields: they are the model directory's data (the fold sets dlr_folded)."""
    names = set()
    for path in HF.rglob("*.py"):
        for cls in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)
                    and not n.name.endswith("Config")):
            for node in cls.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(node.name)
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
                names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names - {n for n in names if n.startswith("__")}


def set_attributes(source: str) -> list[tuple[int, ast.expr, str]]:
    """(line, object, name) of every attribute assignment (`x.name = ...`, `setattr(x, "name", ...)`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            for e in ast.walk(t):  # tuple targets too: a, b.x = ...
                if isinstance(e, ast.Attribute) and isinstance(e.ctx, ast.Store):
                    found.append((node.lineno, e.value, e.attr))
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)) and \
                (node.func.id if isinstance(node.func, ast.Name) else node.func.attr) in ("setattr", "__setattr__") \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            found.append((node.lineno, node.args[0], node.args[1].value))
    return found


def boundary_breaches(source: str, hf_names: set[str]) -> list[str]:
    """A class swapped by assigning `__class__`; a shipped class (or `type(x)`) given an attribute;
    an attribute the shipped classes declare set from outside them (trainer state on the model)."""
    out = []
    for line, obj, name in set_attributes(source):
        on_class = (isinstance(obj, ast.Name) and obj.id in HF_CLASSES) or \
            (isinstance(obj, ast.Call) and isinstance(obj.func, ast.Name) and obj.func.id == "type")
        if name == "__class__":
            out.append(f"{line}: assigns __class__")
        elif on_class:
            out.append(f"{line}: sets {ast.unparse(obj)}.{name}")
        elif name in hf_names and not (isinstance(obj, ast.Name) and obj.id == "self"):
            out.append(f"{line}: sets {ast.unparse(obj)}.{name}, which dlr/hf declares")
    return out


def test_the_scan_finds_class_swaps_and_trainer_state_on_the_shipped_classes():
    names = hf_class_attributes()
    assert {"post_init", "up_weight", "has_residual", "config_class"} <= names
    bad = ("m.__class__ = Other\nsetattr(m, '__class__', Other)\nDlrLlamaForCausalLM.fused_loss = f\n"
           "type(model).loss = f\nmodel.config_class = None\nlayer.up_weight = w\n")
    assert len(boundary_breaches(bad, names)) == 6
    assert boundary_breaches("self.up_weight = w\nmodel.config.dlr_folded = True\nm.other = 1\n", names) == []


def test_no_class_swaps_and_no_trainer_state_on_the_shipped_classes():
    """dlr/hf is what a model directory ships: nothing outside it sets what its classes declare,
    nothing gives them new attributes, and no module anywhere in dlr/ swaps an object's class."""
    names, breaches = hf_class_attributes(), []
    for path in PACKAGE.rglob("*.py"):
        if "assets" in path.parts:
            continue
        found = boundary_breaches(path.read_text(), set() if HF in path.parents else names)
        breaches += [f"{path.relative_to(ROOT)}:{b}" for b in found]
    assert not breaches, breaches


def test_every_package_ships():
    """pyproject.toml lists its packages: a package left out of the list is missing from a
    non-editable install (tests/test_packaging.py installs one; this says which at once)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert packages <= listed, sorted(packages - listed)
