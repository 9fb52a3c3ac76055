"""The Python snippets of README.md and docs/*.md name what the code has.

Each ```python block is parsed, not run: every ``from cloud_jax... import name`` must import, every
call of a cloud_jax function, class or method the snippet can resolve must accept the keywords it
is given (and the number of positional arguments), every attribute read from a resolved object
must exist, and every dotted config override must be a key of the config schema. A snippet's
third-party names (TRL, tunix) and its placeholders (``prompts``, ``policy``) are left alone.
The tests and repository files the docs cite as evidence exist.
"""

import ast
import dataclasses
import importlib
import inspect
import pathlib
import re
import typing

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def _snippets():
    """[(where, source)] of every ```python block."""
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        start = None
        for i, line in enumerate(lines):
            fence = line.strip()
            if start is None and fence.startswith("```python"):
                start = i + 1
            elif start is not None and fence.startswith("```"):
                found.append((f"{path.name}:{start}", "\n".join(lines[start:i])))
                start = None
    return found


SNIPPETS = _snippets()


def _types():
    """What the snippets' conventional names stand for where no line of theirs says so (the
    docs write ``rm`` for a loaded model and ``res`` for its scores)."""
    from cloud_jax.api import RewardModel
    from cloud_jax.scoring.rewards import ScoreResult

    return {"rm": _Instance(RewardModel), "res": _Instance(ScoreResult)}


def _forwarded():
    """Callables whose ``**settings`` are fields of another: {callable: where they go}."""
    from cloud_jax.api import RewardModel, load
    from cloud_jax.evaluation import score_fn_from_model
    from cloud_jax.model.config import ModelConfig
    from cloud_jax.rewards import CLoudReward
    from cloud_jax.scoring.rewards import ScoreConfig

    return {RewardModel.score: ScoreConfig, CLoudReward: ScoreConfig,
            score_fn_from_model: ScoreConfig, load: ModelConfig}


class _Instance:
    """An object of a known class, as far as the snippet shows."""

    def __init__(self, cls):
        self.cls = cls


class _Bound:
    """A method of a known class, not yet called."""

    def __init__(self, cls, name):
        self.cls, self.name = cls, name


def _has_attribute(cls, name: str) -> bool:
    if hasattr(cls, name):
        return True
    if dataclasses.is_dataclass(cls) and name in {f.name for f in dataclasses.fields(cls)}:
        return True
    # Set in __init__ (self.name = ...).
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return False
    return re.search(rf"self\.{re.escape(name)}\b\s*(:[^=\n]*)?=", source) is not None


def _config_key_exists(key: str) -> bool:
    from cloud_jax.training.config import Config

    schema = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(schema):
            return False
        fields = {f.name: f for f in dataclasses.fields(schema)}
        if part not in fields:
            return False
        schema = typing.get_type_hints(schema).get(part)
    return True


class _Checker(ast.NodeVisitor):
    def __init__(self, where: str):
        self.where = where
        self.conventional = _types()
        self.names: dict = dict(self.conventional)
        self.forwarded = _forwarded()
        self.problems: list[str] = []

    def fail(self, node, message: str) -> None:
        """``where`` is "FILE.md:N", N the line of the opening fence: the message names the
        line of the doc."""
        doc, fence = self.where.rsplit(":", 1)
        self.problems.append(f"{doc}:{int(fence) + node.lineno}: {message}")

    # Imports -----------------------------------------------------------------------------
    def visit_Import(self, node):
        for alias in node.names:
            if alias.name.split(".")[0] == "cloud_jax":
                module = importlib.import_module(alias.name)
                if alias.asname:
                    self.names[alias.asname] = module
                else:
                    self.names["cloud_jax"] = importlib.import_module("cloud_jax")

    def visit_ImportFrom(self, node):
        if not (node.module or "").startswith("cloud_jax"):
            return
        try:
            module = importlib.import_module(node.module)
        except ImportError as err:
            self.fail(node, f"no module {node.module}: {err}")
            return
        for alias in node.names:
            if not hasattr(module, alias.name):
                try:
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    self.fail(node, f"{node.module} has no {alias.name}")
                    continue
            self.names[alias.asname or alias.name] = getattr(
                module, alias.name, None) or importlib.import_module(f"{node.module}.{alias.name}")

    # Expressions -------------------------------------------------------------------------
    def resolve(self, node):
        """What an expression is: a module, class or function, an _Instance, a _Bound method, or
        None (not known); the calls in it are checked on the way."""
        if isinstance(node, ast.Name):
            return self.names.get(node.id)
        if isinstance(node, ast.Attribute):
            return self.attribute(node, self.resolve(node.value))
        if isinstance(node, ast.Call):
            return self.call(node)
        for child in ast.iter_child_nodes(node):
            self.resolve(child)
        return None

    def attribute(self, node, base):
        if base is None:
            return None
        if isinstance(base, _Instance):
            if not _has_attribute(base.cls, node.attr):
                self.fail(node, f"{base.cls.__name__} has no attribute {node.attr!r}")
                return None
            member = inspect.getattr_static(base.cls, node.attr, None)
            return _Bound(base.cls, node.attr) if callable(member) else None
        if isinstance(base, _Bound):
            return None
        if not hasattr(base, node.attr):
            self.fail(node, f"{getattr(base, '__name__', base)} has no attribute {node.attr!r}")
            return None
        return getattr(base, node.attr)

    def call(self, node):
        target = self.resolve(node.func)
        for arg in list(node.args) + [k.value for k in node.keywords]:
            self.resolve(arg)
        if target is None or any(isinstance(a, ast.Starred) for a in node.args):
            return None
        positional = len(node.args)
        keywords = [k.arg for k in node.keywords if k.arg is not None]
        if isinstance(target, _Bound):
            function = getattr(target.cls, target.name)
            if target.name == "apply" and _is_flax_module(target.cls):
                # Module.apply(variables, *args, **kwargs) hands them to __call__.
                function, positional = target.cls.__call__, positional - 1
            self.check_signature(node, function, positional + 1, keywords)  # + self
            return _returned(function)
        if isinstance(target, _Instance):
            self.check_signature(node, target.cls.__call__, positional + 1, keywords)
            return None
        if inspect.isclass(target):
            self.check_signature(node, target, positional, keywords)
            return _Instance(target)
        if callable(target):
            self.check_signature(node, target, positional, keywords)
            return _returned(target)
        return None

    def check_signature(self, node, function, positional: int, keywords: list) -> None:
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):
            return
        params = signature.parameters.values()
        named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        extra = [k for k in keywords if k not in named]
        if extra and any(p.kind == p.VAR_KEYWORD for p in params):
            into = self.forwarded.get(function)
            fields = {f.name for f in dataclasses.fields(into)} if into else set(extra)
            extra = [k for k in extra if k not in fields]
        name = getattr(function, "__qualname__", function)
        for k in extra:
            self.fail(node, f"{name} takes no keyword {k!r}")
        takes = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if positional > len(takes) and not any(p.kind == p.VAR_POSITIONAL for p in params):
            self.fail(node, f"{name} takes {len(takes)} positional arguments, given {positional}")

    # Statements, in order ----------------------------------------------------------------
    def visit_Assign(self, node):
        value = self.resolve(node.value)
        for target in node.targets:
            if isinstance(target, ast.Name):
                # A value not known keeps the name's conventional type (rm.score's result).
                value = value if value is not None else self.conventional.get(target.id)
                if value is None:
                    self.names.pop(target.id, None)
                else:
                    self.names[target.id] = value

    def visit_Expr(self, node):
        self.resolve(node.value)

    def visit_Return(self, node):
        if node.value is not None:
            self.resolve(node.value)


def _is_flax_module(cls) -> bool:
    import flax.linen as nn

    return issubclass(cls, nn.Module)


def _returned(function):
    """An _Instance of the annotated return class, where there is one."""
    try:
        hints = typing.get_type_hints(function)
    except Exception:
        return None
    returned = hints.get("return")
    return _Instance(returned) if inspect.isclass(returned) else None


def _problems(where: str, source: str) -> list:
    checker = _Checker(where)
    tree = ast.parse(source)
    checker.visit(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = re.fullmatch(r"((?:model|mesh|data|optim|loss|train)\.[\w.]+)=.*", node.value)
            if m and not _config_key_exists(m.group(1)):
                checker.fail(node, f"config key {m.group(1)!r} is not in the schema")
    return checker.problems


def test_the_docs_have_python_snippets():
    assert len(SNIPPETS) >= 8, [w for w, _ in SNIPPETS]


@pytest.mark.parametrize("source,problem", [
    ("import cloud_jax\nrm = cloud_jax.load('d', dtyp='bfloat16')", "takes no keyword 'dtyp'"),
    ("rm.score(p, r, num_sample=4)", "takes no keyword 'num_sample'"),
    ("res = rm.score(p, r)\nres.reward", "ScoreResult has no attribute 'reward'"),
    ("from cloud_jax.model import CLoudModel\nCLoudModel(c).apply(v, i, m, index=x)",
     "takes no keyword 'index'"),
    ("from cloud_jax.rewards import CLoudReward\nCLoudReward(m, temp=0.7)",
     "takes no keyword 'temp'"),
    ("from cloud_jax.evaluation import ScoreFunction", "has no ScoreFunction"),
    ("f(['model.num_layer=4'])", "config key 'model.num_layer'"),
])
def test_the_check_finds_a_wrong_snippet(source, problem):
    assert problem in " ".join(_problems("X.md:1", source))


@pytest.mark.parametrize("where,source", SNIPPETS, ids=[w for w, _ in SNIPPETS])
def test_a_snippet_names_what_the_code_has(where, source):
    assert _problems(where, source) == []


def test_the_attributes_the_docs_name_exist():
    """``rm.X`` (a RewardModel), ``res.X`` (its scores) and ``reward.X`` (a CLoudReward), in
    prose and in snippets' comments alike."""
    from cloud_jax.api import RewardModel
    from cloud_jax.rewards import CLoudReward
    from cloud_jax.scoring.rewards import ScoreResult

    classes = {"rm": RewardModel, "res": ScoreResult, "reward": CLoudReward}
    missing = []
    for path in DOCS:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in re.finditer(r"(?<![\w./])(rm|res|reward)\.(\w+)", line):
                if m.group(2) not in ("py", "md", "json") and \
                        not _has_attribute(classes[m.group(1)], m.group(2)):
                    missing.append(f"{path.name}:{n}: {m.group(0)}")
    assert missing == []


# Files the docs name that are gone on purpose: their lines tell the history (docs/BENCHMARKS.md,
# docs/RESULTS.md: "since renamed", "now ...").
_RENAMED = {"cloud_jax/model/cpu_attention.cc", "cloud_jax/model/cpu_attention.py",
            "tests/test_cpu_attention.py"}


def _test_names():
    """{test file name: the functions, classes and module-level names it defines}."""
    found = {}
    for path in (ROOT / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        names = {node.name for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        names |= {target.id for node in tree.body if isinstance(node, ast.Assign)
                  for target in node.targets if isinstance(target, ast.Name)}
        found[path.name] = names
    return found


def _expanded(pattern):
    """``a_{1,2}.json`` -> ``a_1.json``, ``a_2.json``."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    return [out for choice in m.group(1).split(",")
            for out in _expanded(pattern[:m.start()] + choice + pattern[m.end():])]


def test_the_tests_and_files_the_docs_cite_exist():
    """Every ``tests/test_x.py::name`` and backticked ``test_name`` the docs cite as evidence is a
    test (or a name) of tests/, and every repository path they name (``cloud_jax/...``,
    ``configs/...``, ``tests/...``, ``docs/...``; braces and globs expanded) exists: a test or a
    file renamed or removed shows here until the docs say so."""
    tests = _test_names()
    every = set().union(*tests.values())
    missing = []
    for path in DOCS:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.name}:{n}"
            for m in re.finditer(r"tests/(test_\w+\.py)::(\w+)", line):
                if m.group(2) not in tests.get(m.group(1), ()):
                    missing.append(f"{where}: {m.group(0)}")
            for m in re.finditer(r"`(test_\w+)`", line):
                if m.group(1) not in every:
                    missing.append(f"{where}: {m.group(1)}")
            for m in re.finditer(r"(?<![\w/.-])((?:cloud_jax|configs|tests|tools|tpu_scripts|"
                                 r"notebooks|docs)/[\w./{},*-]*[\w*}])", line):
                name = m.group(1)
                if name in _RENAMED or re.search(r"/[A-Z]+\.", name):  # configs/X.yaml
                    continue
                for one in _expanded(name):
                    if not list(ROOT.glob(one)):
                        missing.append(f"{where}: {one}")
    assert missing == []
