"""The job contract as command-line flags: `qaas submit` and `qaas quantize` offer every job option with the
contract's choices and defaults, and a bad value gets the contract's message (qaas.contract.jobs.explain).

    add_job_flags(parser)          # --mode, --backend, then one flag per option: --weight-granularity ...
    args = parser.parse_args()
    given = job_flags(args)        # JobFlags: the options and the benchmark, validated; raises FlagError

Each field of `JobOptions` and `BenchmarkOptions` is a flag named after it (`batch_sizes`: --batch-sizes); a
nested model's fields are flags too (`qat.epochs`: --epochs), qualified by the model's name where the name is
taken (`qat.batch_size`: --qat-batch-size). Enumerations become argparse choices, a number tuple is comma
separated (--batch-sizes 1,8), a string tuple is a repeated flag (--exclude head --exclude Conv2d), an optional
bool is --name / --no-name. A flag not given is left out, so what the contract (or a server) defaults applies.
Only argparse, pydantic and the contract: the client imports it.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qaas.contract.jobs import DEFAULT_BACKEND, BenchmarkOptions, JobOptions, RunnerSpec, explain
from qaas.contract.vocab import Mode

__all__ = ["FlagError", "JobFlags", "add_job_flags", "job_flags"]

# A job's mode is always named by its caller: the command line's default is the mode that needs no data.
DEFAULT_MODE = Mode.DYNAMIC


class FlagError(ValueError):
    """A flag's value the contract refuses: the message names the field and what to use."""


class JobFlags(BaseModel):
    """What the flags fill in a job: its options and its benchmark (the request's fields of those names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    options: JobOptions = Field(default_factory=JobOptions)
    benchmark: BenchmarkOptions = Field(default_factory=BenchmarkOptions)


@dataclass(frozen=True)
class _Flag:
    path: tuple[str, ...]  # the field's place in JobFlags: ("options", "qat", "epochs")
    name: str  # "--epochs"
    annotation: Any
    help: str

    @property
    def dest(self) -> str:
        return ".".join(self.path)


def _fields(model: type[BaseModel], path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    for name, field in model.model_fields.items():
        yield (*path, name), field


def _flags() -> list[_Flag]:
    """Every leaf field of JobFlags, shallower first, so that a nested field yields its name when taken."""
    flags: list[_Flag] = []
    taken: set[str] = set()
    level = list(_fields(JobFlags, ()))
    while level:
        deeper = []
        for path, field in level:
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                deeper += list(_fields(annotation, path))
                continue
            name = path[-1]
            if name in taken:
                name = f"{path[-2]}_{name}"
            taken.add(name)
            text = f"{field.description or ''}{_shown(field.get_default(call_default_factory=True))}".strip()
            flags.append(_Flag(path, "--" + name.replace("_", "-"), annotation, text))
        level = deeper
    return flags


def _shown(default: Any) -> str:
    if default is None or default == ():
        return ""
    if isinstance(default, tuple):
        return " (default: " + ",".join(map(str, default)) + ")"
    return f" (default: {default.value if isinstance(default, Enum) else default})"


def _choices(annotation: Any) -> list[str] | None:
    if get_origin(annotation) is Literal:
        return [str(value) for value in get_args(annotation)]
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return [str(member.value) for member in annotation]
    return None


def _bare(annotation: Any) -> Any:
    """The type under Annotated[...] (a tuple's item type keeps its bounds there)."""
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def _number_list(item: type) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(item(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of {item.__name__}s, e.g. 1,8"
            ) from None

    parse.__name__ = f"{item.__name__} list"
    return parse


def _argparse_kwargs(flag: _Flag) -> dict[str, Any]:
    """How argparse reads the flag, from its field's type. TypeError for a type no flag can carry yet."""
    annotation, help_text = flag.annotation, flag.help.replace("%", "%%")
    choices = _choices(annotation)
    if choices is not None:
        return {"choices": choices, "help": help_text}
    if get_origin(annotation) in (Union, types.UnionType):
        present = [arg for arg in get_args(annotation) if arg is not type(None)]
        annotation = present[0] if len(present) == 1 else annotation
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction, "help": help_text}
    if annotation in (int, float, str):
        return {
            "type": annotation,
            "metavar": {int: "N", float: "X", str: "TEXT"}[annotation],
            "help": help_text,
        }
    if get_origin(annotation) is tuple and get_args(annotation)[1:] == (Ellipsis,):
        item = _bare(get_args(annotation)[0])
        if item is str:
            return {"action": "append", "metavar": "NAME", "help": f"{help_text} (repeatable)"}
        if item in (int, float):
            return {"type": _number_list(item), "metavar": "N,N", "help": help_text}
    raise TypeError(f"{flag.dest}: no command-line flag reads a {annotation!r} yet (qaas.contract.flags)")


def add_job_flags(parser: argparse.ArgumentParser) -> None:
    """--mode and --backend (with their defaults), then a flag for every option and benchmark field (absent
    unless given)."""
    parser.add_argument(
        "--mode",
        choices=_choices(Mode),
        default=DEFAULT_MODE.value,
        help=f"the quantization mode (default: {DEFAULT_MODE})",
    )
    backend = RunnerSpec.model_fields["backend"]
    parser.add_argument(
        "--backend",
        choices=_choices(backend.annotation),
        default=DEFAULT_BACKEND.value,
        help=f"{backend.description}{_shown(DEFAULT_BACKEND)}",
    )
    groups: dict[tuple[str, ...], Any] = {}
    for flag in _flags():
        section = flag.path[:-1]  # ("options", "qat"): the request's `options.qat`
        if section not in groups:
            title = f"job {'.'.join(section)} (unset: the contract's default)"
            groups[section] = parser.add_argument_group(title)
        groups[section].add_argument(flag.name, dest=flag.dest, default=None, **_argparse_kwargs(flag))


def _nest(given: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dest, value in given.items():
        *parents, leaf = dest.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        below = out.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            value = _merged(below, value)
        out[key] = value
    return out


def job_flags(args: argparse.Namespace, base: Mapping[str, Any] | None = None) -> JobFlags:
    """The options and benchmark the flags give, over `base` ({"options": {...}, "benchmark": {...}}, e.g.
    from JSON), validated by the contract: `exclude_unset` dumps hold only what was asked.

    Raises:
        FlagError: a value the contract refuses ("options.seed: must be >= 0, got -1").
    """
    dests = {flag.dest for flag in _flags()}
    given = {dest: value for dest, value in vars(args).items() if dest in dests and value is not None}
    try:
        return JobFlags.model_validate(_merged(base or {}, _nest(given)))
    except ValidationError as exc:
        raise FlagError(explain(exc)) from None
