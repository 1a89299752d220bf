"""``--config FILE``: a command's options from a TOML file, for scheduled jobs (README "Scheduled backups").

The file's keys are the commands' long option names without the dashes; per-command tables override the
top level for their command; the command line wins over both::

    repo = "s3://backups/fleece"            # --repo, for every command of this file
    password-file = "/etc/fleece/password"  # secrets only by reference
    tag = ["nightly"]                       # a repeatable option: a list (or one value)
    full = true                             # a flag: true (false: as if not given)

    [backup]
    workers = 2                             # backup only; beats a top-level workers

    [forget]
    keep-daily = 7

Rules (a typo in a backup job must fail the job, never be ignored):

- A top-level key must be an option of *some* command; it applies to every command that has it and is
  ignored by the others (``keep-daily`` at top level is for forget, backup skips it).
- A key in ``[COMMAND]`` must be an option of COMMAND (``[key]`` applies to every ``key`` action). Every
  table is checked, whichever command runs, so a typo in ``[forget]`` already fails the nightly backup.
- Values go through the same checks as on the command line: a bad one is one line naming the file and key
  (exit 2). A value the command line gives replaces the file's, a repeatable option's list included.
- Required options (``--repo``, ``forget --vm``, ...) may come from the file; argparse checks required-ness
  after the merge, with its usual message.

How: the command line is parsed once with every option optional and every default a marker (what did the
command line give? which command is it? which file?), then the file's values become the defaults of a
fresh parser, which parses the command line for real: argparse's own rules (types, conversions, required
options, exclusive groups) decide the rest, exactly as without a file.
"""

from __future__ import annotations

import argparse
import difflib
import os
import stat
import sys
import tomllib
from collections.abc import Callable, Sequence
from typing import Any

from fleece.repository.errors import UsageError

OPTION = "--config"

#: options a file must not set (``config``: no includes; help and version are not options of a job)
RESERVED = frozenset({"config", "help", "version"})


class _Unset:
    def __repr__(self) -> str:
        return "<not given>"


UNSET: Any = _Unset()


def add_config_option(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` on *p*, or, if *p* only dispatches to actions (``fleece key``), on each action."""
    children = _children(p)
    if children:
        for child in children.values():
            add_config_option(child)
        return
    p.add_argument(OPTION, metavar="FILE",
                   help="read options from this TOML file: keys are long option names (repo = \"...\"), "
                        "[COMMAND] tables override the top level, the command line wins")


def _children(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _leaves(p: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every parser that takes options, by its command path: ``("backup",)``, ``("key", "list")``, ..."""
    children = _children(p)
    if not children:
        return {path: p}
    out: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for name, child in children.items():
        out.update(_leaves(child, path + (name,)))
    return out


def _options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The keys a file may give for parser *p*: each long option name without ``--``."""
    out: dict[str, argparse.Action] = {}
    for action in p._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        for s in action.option_strings:
            if s.startswith("--") and s[2:] not in RESERVED:
                out[s[2:]] = action
    return out


def _all_parsers(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [p]
    for child in _children(p).values():
        out.extend(_all_parsers(child))
    return out


def _unmarked(action: argparse.Action) -> Any:
    """What the first pass leaves in the namespace when the command line does not give *action*."""
    if isinstance(action, (argparse._CountAction, argparse._AppendAction, argparse._AppendConstAction)):
        return None  # these build on the namespace's value: None is their "nothing yet"
    return UNSET


class _Redo(Exception):
    """Pass 1 met --help or --version: the real parser shows them."""


def _silent(message: str, file: Any = None) -> None:
    pass


def _redo(status: int = 0, message: str | None = None) -> None:
    raise _Redo


def parse_args(build: Callable[[], argparse.ArgumentParser], argv: Sequence[str]) -> argparse.Namespace:
    """*argv* parsed by ``build()``, with the defaults of ``--config FILE`` if the command line names one.

    Without ``--config`` this is exactly ``build().parse_args``. With it, a command line that is wrong
    whatever the file says (an unknown flag, a bad value) fails before the file is read.
    Raises what the parser's ``error`` raises, or :class:`UsageError` for the file.
    """
    argv = list(argv)
    first = build()
    for p in _all_parsers(first):  # pass 1: nothing required, every default a marker, nothing printed
        p._print_message = _silent  # type: ignore[method-assign]
        p.exit = _redo  # type: ignore[method-assign]
        for action in p._actions:
            if action.default is not argparse.SUPPRESS and not isinstance(
                    action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                action.default = _unmarked(action)
            if not isinstance(action, argparse._SubParsersAction):
                action.required = False
        for group in p._mutually_exclusive_groups:
            group.required = False
    try:
        given_ns = first.parse_args(argv)
    except _Redo:  # --help, --version: the real parser shows them
        return build().parse_args(argv)
    except Exception as exc:  # noqa: BLE001 - the command line is wrong whatever a file says
        if not any(a == OPTION or a.startswith(OPTION + "=") for a in argv):
            return build().parse_args(argv)  # exactly as before --config existed
        # its own error, not "--repo is required" (the file, never read, may give it), from the real parser
        # of that command (whose usage text is the real one)
        prog = getattr(getattr(exc, "parser", None), "prog", None)
        real = build()
        for p in _all_parsers(real):
            if p.prog == prog:
                real = p
                break
        real.error(str(exc))
        raise
    path = getattr(given_ns, "config", None)
    if path is None or path is UNSET:
        return build().parse_args(argv)

    parser = build()
    leaves = _leaves(parser)
    command = tuple(getattr(given_ns, a.dest) for a in _subparser_actions(parser, given_ns))
    leaf = leaves[command]
    options = _options(leaf)
    given = {a.dest for a in options.values()
             if getattr(given_ns, a.dest, UNSET) is not _unmarked(a) and getattr(given_ns, a.dest, UNSET) is not UNSET}
    values = load(path, leaves, command)
    for group in leaf._mutually_exclusive_groups:  # the command line's choice in a group wins over the file's
        members = {a.dest for a in group._group_actions}
        from_file = sorted(k for k in values if options[k].dest in members)
        if members & given:
            for k in from_file:
                del values[k]
        elif len(from_file) > 1:
            raise UsageError(f"{path}: keys {' and '.join(repr(k) for k in from_file)} exclude each other: give one")
    for key, value in values.items():
        action = options[key]
        if action.dest in given:
            continue  # the command line wins (for a repeatable option: its whole list)
        converted = _convert(action, value, f"{path}: key {key!r} ({action.option_strings[-1]})")
        if converted is UNSET:
            continue
        action.default = converted
        action.required = False
        for group in leaf._mutually_exclusive_groups:
            if action in group._group_actions:
                group.required = False
    return parser.parse_args(argv)


def _subparser_actions(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> list[argparse.Action]:
    """The chain of subcommand choices *ns* took (``command``, then ``key_action`` for ``fleece key``)."""
    out: list[argparse.Action] = []
    p: argparse.ArgumentParser | None = parser
    while p is not None:
        sub = next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None:
            break
        out.append(sub)
        p = sub.choices.get(getattr(ns, sub.dest))
    return out


def load(path: str, leaves: dict[tuple[str, ...], argparse.ArgumentParser],
         command: tuple[str, ...]) -> dict[str, Any]:
    """The keys of *path* for *command* (top level, then its table over it), every key of the file checked."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            doc = tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # TOMLDecodeError, or bytes that are not UTF-8
        raise UsageError(f"config {path} is not valid TOML: {' '.join(str(exc).split())}") from None
    if mode & stat.S_IWOTH:
        sys.stderr.write(f"fleece: warning: config {path} is writable by every user: anyone could change what is "
                         f"backed up and where to (chmod o-w {path})\n")
    by_command: dict[str, dict[str, argparse.Action]] = {}
    for cmd, leaf in leaves.items():
        by_command.setdefault(cmd[0], {}).update(_options(leaf))
    anywhere = {k for opts in by_command.values() for k in opts}
    mine = _options(leaves[command])
    top: dict[str, Any] = {}
    table: dict[str, Any] = {}
    for key, value in doc.items():
        if key in by_command and isinstance(value, dict):
            for k in value:
                _check_key(path, k, by_command[key], f"in [{key}]", f"{key} has no --{k}")
            if key == command[0]:
                table = value
        elif isinstance(value, dict) and key not in anywhere:
            raise UsageError(f"{path}: unknown table [{key}]{_hint(key, by_command)}: tables are named for commands "
                             f"({', '.join(sorted(by_command))})")
        else:
            _check_key(path, key, anywhere, "", f"no fleece command has --{key}")
            if key in mine:
                top[key] = value
    return {**top, **table}


def _check_key(path: str, key: str, known: Any, where: str, why: str) -> None:
    if key == "config":
        raise UsageError(f"{path}: key 'config' {where + ' ' if where else ''}is not allowed: a config cannot name "
                         "another config")
    if key not in known:
        raise UsageError(f"{path}: unknown key {key!r}{' ' + where if where else ''}{_hint(key, known)}: {why}")


def _hint(key: str, known: Any) -> str:
    close = difflib.get_close_matches(key.replace("_", "-"), sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    """*value* from the file as the namespace value argparse would give *action* (``UNSET``: as if absent)."""
    flag = action.nargs == 0
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UsageError(f"{where}: is a count: write a whole number of 0 or more")
        return value or UNSET
    if isinstance(action, argparse._AppendAction):
        if isinstance(value, bool):
            if action.nargs != "?":
                raise UsageError(f"{where}: takes a value (or a list of them), not {str(value).lower()}")
            return [action.const] if value else UNSET  # full = true: a bare --full
        items = value if isinstance(value, list) else [value]
        return [_scalar(action, item, where)[1] for item in items]
    if flag:
        if not isinstance(value, bool):
            raise UsageError(f"{where}: is a flag: write true or false")
        return action.const if value else UNSET
    if isinstance(value, bool):
        raise UsageError(f"{where}: takes a value, not {str(value).lower()}")
    text, result = _scalar(action, value, where)
    # argparse converts a str default itself: give it the text, which converts to the same result
    return text if isinstance(result, str) else result


def _scalar(action: argparse.Action, value: Any, where: str) -> tuple[str, Any]:
    """(the text a command line would carry, what the option's type makes of it)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        kind = "a list" if isinstance(value, list) else "a table" if isinstance(value, dict) else type(value).__name__
        raise UsageError(f"{where}: is {kind}: write a string or a number"
                         + (" (the option is not repeatable)" if isinstance(value, list) else ""))
    text = value if isinstance(value, str) else str(value)
    result: Any = text
    if action.type is not None:
        try:
            result = action.type(text)  # type: ignore[operator]
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"{where}: {exc}") from None
        except (TypeError, ValueError):
            name = getattr(action.type, "__name__", repr(action.type))
            raise UsageError(f"{where}: invalid {name} value: {text!r}") from None
    if action.choices is not None and result not in action.choices:
        raise UsageError(f"{where}: invalid choice: {text!r} (choose from {', '.join(map(repr, action.choices))})")
    return text, result
