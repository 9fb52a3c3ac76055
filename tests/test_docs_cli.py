"""Every flag of every command is documented, with the default its --help has.

Each command's flags are listed in one table of the docs (docs/CLI.md, or the command's own doc),
`| flag | default | meaning |`, one row per flag or per group of flags sharing a default. A
default that is a value (a number, a word, a list) is written first in its cell, in backticks,
exactly as the parser holds it; a flag with no value by default (a switch, an optional flag, a
required one) says in words what happens without it. A flag added, removed, renamed or given
another default shows here until its table says so. And every command line the docs write
(`python -m cloud_jax score --checkpoint C ...`, in a code block or in prose) names flags its
command has.
"""

import argparse
import contextlib
import importlib
import io
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# command -> (doc, the heading its table follows)
TABLES = {
    "train": ("CLI.md", "## `python -m cloud_jax.train`"),
    "pipeline": ("CLI.md", "## `pipeline`"),
    "demo": ("CLI.md", "## `demo`"),
    "convert-gguf": ("CLI.md", "## `convert-gguf`"),
    "export-hf": ("CLI.md", "## `export-hf`"),
    "score": ("CLI.md", "## `score`"),
    "critique": ("CLI.md", "## `critique`"),
    "evaluate": ("EVALUATION.md", "# Evaluation"),
    "make-benchmark": ("CLI.md", "## `make-benchmark`"),
    "aot": ("CLI.md", "## `aot`"),
    "serve": ("SERVING.md", "## The server"),
    "bench train": ("CLI.md", "## `bench train`"),
    "bench sample": ("CLI.md", "## `bench sample`"),
    "bench serve": ("CLI.md", "## `bench serve`"),
}


@pytest.fixture(scope="module")
def parsers():
    """{command: its argparse parser}, caught as `main(["--help"])` asks it to print its help."""
    from cloud_jax.__main__ import COMMANDS
    from cloud_jax.cli.bench import BENCHMARKS

    modules = {name: module for name, (module, _) in COMMANDS.items() if name != "bench"}
    modules.update({f"bench {name}": module for name, (module, _) in BENCHMARKS.items()})
    modules["train"] = "cloud_jax.cli.train"
    caught = {}

    def catch(self, parser, *args, **kwargs):
        caught["parser"] = parser
        raise SystemExit(0)

    found = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse._HelpAction, "__call__", catch)
        for name, module in modules.items():
            caught.clear()
            with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
                importlib.import_module(module).main(["--help"])
            found[name] = caught["parser"]
    return found


def _flags(parser):
    """{option string: its action} of every long option but --help."""
    return {o: a for a in parser._actions for o in a.option_strings
            if o.startswith("--") and not isinstance(a, argparse._HelpAction)}


def _table(doc, heading):
    """[(flags, default cell)] of the first table after heading in docs/doc (or README.md)."""
    path = ROOT / doc if doc == "README.md" else ROOT / "docs" / doc
    text = path.read_text()
    assert heading in text, f"{doc}: no heading {heading!r}"
    after = text[text.index(heading):]
    start = after.index("\n| flag | default | meaning |")
    table = after[start + 1:].split("\n\n")[0].splitlines()
    assert set(table[1]) <= set("|-"), (doc, heading, table[1])
    rows = []
    for line in table[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 3, (doc, heading, line)
        flags = re.findall(r"`(--[a-z][\w-]*)`", cells[0])
        assert flags and re.fullmatch(r"(`--[a-z][\w-]*`(, | / )?)+", cells[0]), (doc, line)
        rows.append((flags, cells[1]))
    return rows


def _has_value(action):
    """Whether a flag's default is a value the docs must show (not a switch, not unset)."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                           argparse.BooleanOptionalAction)):
        return False
    return action.default not in (None, "", [], ()) and action.default is not argparse.SUPPRESS


def _same(cell_value, default):
    if isinstance(default, (tuple, list)):
        return cell_value == ",".join(map(str, default))
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return float(cell_value) == float(default)
        except ValueError:
            return False
    return cell_value == str(default)


def test_every_command_has_a_flag_table():
    from cloud_jax.__main__ import COMMANDS
    from cloud_jax.cli.bench import BENCHMARKS

    commands = ({c for c in COMMANDS if c != "bench"} | {f"bench {b}" for b in BENCHMARKS}
                | {"train"})
    assert commands == set(TABLES)


@pytest.mark.parametrize("command", sorted(TABLES))
def test_the_flag_table_lists_every_flag_with_its_default(command, parsers):
    _check_table(command, parsers[command])


def test_the_tables_hold_on_a_machine_of_another_size(monkeypatch):
    """A default that follows the machine (its CPU count) is no parser default, whose value the
    table would hold only on the machine that wrote it: the commands resolve it after parsing."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    found = {}

    def catch(self, parser, *args, **kwargs):
        found["parser"] = parser
        raise SystemExit(0)

    monkeypatch.setattr(argparse._HelpAction, "__call__", catch)
    for command in sorted(TABLES):
        if not command.startswith("bench "):
            continue
        found.clear()
        module = importlib.import_module(f"cloud_jax.cli.bench.{command.split()[1]}")
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
            module.main(["--help"])
        _check_table(command, found["parser"])


def _check_table(command, parser):
    flags = _flags(parser)
    rows = _table(*TABLES[command])
    documented = [f for row_flags, _ in rows for f in row_flags]
    assert len(documented) == len(set(documented)), f"{command}: a flag listed twice"
    assert set(flags) - set(documented) == set(), f"{command}: flags the table leaves out"
    assert set(documented) - set(flags) == set(), f"{command}: table rows that are no flag"
    for row_flags, cell in rows:
        assert cell, (command, row_flags, "an empty default cell")
        for flag in row_flags:
            action = flags[flag]
            if _has_value(action):
                m = re.match(r"`([^`]*)`", cell)
                assert m, (command, flag, f"default {action.default!r} not written first in "
                                          f"backticks: {cell!r}")
                assert _same(m.group(1), action.default), (command, flag, cell, action.default)


def _command_lines():
    """[(where, command, [flags])] of every `python -m cloud_jax <command> --flag ...` (and
    `python -m cloud_jax.train ...`) written in README.md and docs/*.md, in a code block or not."""
    from cloud_jax.cli.bench import BENCHMARKS

    found = []
    for path in [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in re.finditer(r"python -m cloud_jax(\.train)?\b((?: +[^`#|]*)?)", line):
                # --debug, before the command, is the entry point's own.
                words = [w for w in m.group(2).split() if w.strip("[]") != "--debug"]
                if m.group(1):
                    command = "train"
                elif not words or not re.fullmatch(r"[a-z][a-z-]*", words[0]):
                    continue  # `python -m cloud_jax <command>`, `python -m cloud_jax ...`
                else:
                    command, words = words[0], words[1:]
                    if command == "bench" and words and words[0] in BENCHMARKS:
                        command, words = f"bench {words[0]}", words[1:]
                flags = [f for w in words for f in re.findall(r"(?:^|[\[(])(--[a-z][\w-]*)", w)]
                found.append((f"{path.name}:{n}", command, flags))
    return found


def test_the_commands_the_docs_write_take_their_flags(parsers):
    lines = _command_lines()
    assert len(lines) > 50
    wrong = []
    for where, command, flags in lines:
        if command == "bench":  # `bench train|sample|serve`
            continue
        if command not in parsers:
            wrong.append(f"{where}: no command {command!r}")
            continue
        known = {o for a in parsers[command]._actions for o in a.option_strings}
        wrong += [f"{where}: {command} has no flag {f}" for f in flags if f not in known]
    assert wrong == []
