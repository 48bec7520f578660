"""The generated reference pages of docs/: the configuration from the settings models, the
command line from the `alflow` command tree.

    python -m alflow.config.reference           # write docs/configuration.md and docs/cli.md
    python -m alflow.config.reference --check   # exit 1 naming each page that differs

Each key's section, type, default, allowed values and description come from the pydantic
models of config/settings.py and config/sources.py (a key without a ``description`` is an
error naming it); each command's help is click's plain help of the `alflow` command tree at
a fixed width, so the pages are the same on every terminal. tests/test_docs.py fails when a
page differs from what this module writes now.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

DOCS = Path(__file__).resolve().parents[1] / "docs"
CONFIG_PAGE = "configuration.md"
CLI_PAGE = "cli.md"
HELP_WIDTH = 88  # columns of the generated --help text
GENERATOR = "python -m alflow.config.reference"
_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", Path: "path"}
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


# -- configuration ------------------------------------------------------------------------
def toml_value(value: Any) -> str:
    """``value`` as it is written in alflow.toml: ``"margin"``, ``true``, ``{ C = 10.0 }``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")  # a basic string: one line
        return f'"{text}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        pairs = (f"{k if _BARE_KEY.match(str(k)) else toml_value(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(pairs) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def _members(annotation: Any) -> list[Any]:
    """The types a Union (or ``X | None``) allows, None left out; ``[annotation]`` otherwise."""
    if get_origin(annotation) in (Union, types.UnionType):
        return [a for a in get_args(annotation) if a is not type(None)]
    return [annotation]


def type_name(annotation: Any) -> str:
    """A key's type in words: ``integer``, ``string or number``, ``list of strings``, ``table``."""
    names = []
    members = _members(annotation)
    for member in members:
        origin = get_origin(member)
        if origin is Literal and len(members) > 1:  # "auto" or number: the literal is the type
            name = " or ".join(toml_value(v) for v in get_args(member))
        elif origin is Literal:
            name = " or ".join(dict.fromkeys(_TYPES.get(type(v), "value") for v in get_args(member)))
        elif origin is list:
            name = f"list of {type_name(get_args(member)[0])}s"
        elif origin is dict:
            name = "table"
        else:
            name = _TYPES.get(member, getattr(member, "__name__", str(member)))
        names.append(name)
    return " or ".join(dict.fromkeys(names))


def allowed_values(field: FieldInfo) -> str:
    """The values a key accepts beyond its type: literals, bounds, lengths, a pattern."""
    members = _members(field.annotation)
    # a literal beside other types ("auto" or number) is named by the type column already
    parts = [_code(toml_value(v)) for member in members if get_origin(member) is Literal and len(members) == 1
             for v in get_args(member)]
    bounds, lengths = [], {}
    for rule in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(rule, attr, None) is not None:
                bounds.append(f"{sign} {getattr(rule, attr)}")
        for attr in ("min_length", "max_length"):
            if getattr(rule, attr, None) is not None:
                lengths[attr] = getattr(rule, attr)
        if getattr(rule, "pattern", None):
            parts.append(f"matching {_code(rule.pattern)}")
    if bounds:
        parts.append(", ".join(bounds))
    if lengths:
        unit = "items" if any(get_origin(m) is list for m in members) else "characters"
        low, high = lengths.get("min_length"), lengths.get("max_length")
        if low == high:
            parts.append(f"exactly {low} {unit.rstrip('s') if low == 1 else unit}")
        elif high is not None:
            parts.append(f"{low or 0}-{high} {unit}")
        else:
            parts.append("not empty" if low == 1 else f"at least {low} {unit}")
    return ", ".join(parts) if all(p.startswith("`") for p in parts) else "; ".join(parts)


def default_value(field: FieldInfo) -> str:
    """The default as written in alflow.toml (a code span), "required", or "unset" (None)."""
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    return "unset" if value is None else _code(toml_value(value))


def _cell(text: str) -> str:
    """Text for one Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    """A Markdown code span holding ``text`` (a backtick inside gets a longer fence)."""
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _doc(model: type[BaseModel]) -> str:
    """A model's docstring as Markdown (reST ``literals`` become `code`)."""
    text = inspect.cleandoc(model.__doc__ or "")
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def _ordered_fields(model: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    """The keys a user writes: ``type`` and ``name`` first, then the model's own keys, then
    those it inherits (the network sources' shared timeouts and retries)."""
    fields = [(name, f) for name, f in model.model_fields.items() if not f.exclude]
    own = set(inspect.get_annotations(model))
    first = ("type", "name")
    return sorted(fields, key=lambda nf: (nf[0] not in first, first.index(nf[0]) if nf[0] in first else 0,
                                          nf[0] not in own))


def key_table(model: type[BaseModel], where: str) -> list[str]:
    """A Markdown table of the scalar keys of ``model`` (sections and sources excluded).
    ``where`` names the section in errors. Raises ValueError for a key without description."""
    rows = ["| key | type | default | allowed values | description |", "|---|---|---|---|---|"]
    for name, field in _ordered_fields(model):
        if _section_model(field) is not None or name == "sources":
            continue
        if not field.description:
            raise ValueError(f"{where}{name}: no description; add description= to its Field")
        rows.append(f"| {_code(name)} | {type_name(field.annotation)} | {default_value(field)} | "
                    f"{_cell(allowed_values(field))} | {_cell(field.description)} |")
    return rows


def _section_model(field: FieldInfo) -> type[BaseModel] | None:
    annotation = field.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def source_models(settings_model: type[BaseModel]) -> list[type[BaseModel]]:
    """The ``[[sources]]`` types, in the order of the discriminated union."""
    (item,) = get_args(settings_model.model_fields["sources"].annotation)  # list[Annotated[Union, discriminator]]
    union = get_args(item)[0] if get_origin(item) is Annotated else item
    return list(get_args(union))


def _source_type(model: type[BaseModel]) -> str:
    (value,) = get_args(model.model_fields["type"].annotation)
    return value


def configuration_page() -> str:
    """docs/configuration.md: every key of alflow.toml, section by section."""
    from alflow.config.settings import ENV_PREFIX, Settings

    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{GENERATOR}` from config/settings.py and config/sources.py: do not edit. -->",
        "",
        "alflow reads `alflow.toml` (the file `--config` names, else `$ALFLOW_CONFIG`, else `./alflow.toml`;",
        "`alflow init` writes the annotated example). Relative paths are resolved against the file's folder.",
        f"Any key can be overridden by an environment variable `{ENV_PREFIX}<SECTION>__<KEY>`",
        f"(`{ENV_PREFIX}QUERY__BATCH_SIZE=50`), a top-level key by `{ENV_PREFIX}<KEY>`",
        f"(`{ENV_PREFIX}DATABASE=/data/al.duckdb`); a table or a list is given whole as JSON",
        f"(`{ENV_PREFIX}MODEL__CLASSIFIER_PARAMS='{{\"C\": 1.0}}'`). Any other",
        f"`{ENV_PREFIX}*` variable (`{ENV_PREFIX}REPO`, `{ENV_PREFIX}CONFIG`) is not a setting and is left alone.",
        "Everything is validated at start-up; a mistake is one line naming the key and where it came from:",
        "",
        "```text",
        "error: /work/alflow.toml: query.batchsize: unknown key",
        "```",
        "",
        "Contents: [top-level keys](#top-level-keys)"
        + "".join(f", [`[{name}]`](#{name})" for name, f in Settings.model_fields.items() if _section_model(f))
        + ", [`[[sources]]`](#sources).",
        "",
        "## Top-level keys",
        "",
        _doc(Settings),
        "",
        *key_table(Settings, ""),
    ]
    for name, field in Settings.model_fields.items():
        section = _section_model(field)
        if section is None:
            continue
        lines += ["", f"## `[{name}]`", "", _doc(section), "",
                  f"Environment: `{ENV_PREFIX}{name.upper()}__<KEY>`.", "", *key_table(section, f"{name}.")]
    lines += ["", "## `[[sources]]`", "",
              "Where items come from: each source is one `[[sources]]` table, and its `type` chooses which",
              f"keys apply. The whole list can be overridden as JSON by `{ENV_PREFIX}SOURCES`. How each type",
              "reads, fails and fetches incrementally: [Sources](sources.md)."]
    for model in source_models(Settings):
        kind = _source_type(model)
        lines += ["", f"### `type = \"{kind}\"`", "", _doc(model), "", *key_table(model, f"sources ({kind}).")]
    return "\n".join(lines) + "\n"


# -- command line -------------------------------------------------------------------------
def command_tree():
    """The `alflow` command as a click command (typer's own, vendored click classes), its
    help texts as a terminal shows them: rich markup rendered to plain text (``\\[model]``
    is ``[model]``), and plain click formatting (no rich panels, no box drawing)."""
    from typer.main import get_command

    from alflow.flows.cli import app

    root = get_command(app)  # fresh objects: changing them changes nothing else
    for command in _walk(root):
        command.rich_markup_mode = None
        for owner in (command, *command.params):
            for attr in ("help", "short_help", "epilog"):
                if getattr(owner, attr, None):
                    setattr(owner, attr, _rendered(getattr(owner, attr)))
    return root


def _walk(command):
    yield command
    for sub in getattr(command, "commands", {}).values():
        yield from _walk(sub)


def _rendered(markup: str) -> str:
    """What rich shows of ``markup``: tags applied (and dropped), escapes resolved."""
    from rich.errors import MarkupError
    from rich.text import Text

    try:
        return Text.from_markup(markup).plain
    except MarkupError:  # not markup after all: shown as written
        return markup


def _contexts(command, path: tuple[str, ...] = ("alflow",), parent=None):
    """(path, command, context) for ``command`` and every subcommand below it, depth first, in
    the order `--help` lists them. Contexts carry the fixed width, so help text is stable."""
    ctx = command.context_class(command, info_name=path[-1], parent=parent, terminal_width=HELP_WIDTH,
                                max_content_width=HELP_WIDTH)
    yield path, command, ctx
    for name in getattr(command, "list_commands", lambda _ctx: [])(ctx):
        yield from _contexts(command.commands[name], path + (name,), ctx)


def plain_help(command, ctx) -> str:
    """The help of ``command`` (from :func:`command_tree`), trailing spaces stripped."""
    return "\n".join(line.rstrip() for line in command.get_help(ctx).splitlines())


def cli_page() -> str:
    """docs/cli.md: `alflow --help` and every subcommand's `--help`."""
    entries = list(_contexts(command_tree()))
    lines = [
        "# Command-line reference",
        "",
        f"<!-- Generated by `{GENERATOR}` from the `alflow` command: do not edit. -->",
        "",
        "Every command's `--help`. A known failure is one line on stderr and exit status 1.",
        "",
        *(f"- [`{' '.join(path)}`](#{'-'.join(path)})" for path, _, _ in entries),
    ]
    for path, command, ctx in entries:
        lines += ["", f"## `{' '.join(path)}`", "", "```text", plain_help(command, ctx), "```"]
    return "\n".join(lines) + "\n"


# -- the pages ----------------------------------------------------------------------------
def pages() -> dict[str, str]:
    """File name in docs/ -> the text it must hold."""
    return {CONFIG_PAGE: configuration_page(), CLI_PAGE: cli_page()}


def _differing(docs: Path, texts: dict[str, str]) -> list[Path]:
    return [docs / name for name, text in texts.items()
            if not (docs / name).is_file() or (docs / name).read_text(encoding="utf-8") != text]


def stale_pages(docs: Path = DOCS) -> list[Path]:
    """The generated pages under ``docs`` that are missing or differ from what would be written now."""
    return _differing(docs, pages())


def write_pages(docs: Path = DOCS) -> list[Path]:
    """Write the pages that changed; returns them."""
    docs.mkdir(parents=True, exist_ok=True)
    texts = pages()
    changed = _differing(docs, texts)
    for path in changed:
        path.write_text(texts[path.name], encoding="utf-8")
    return changed


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m alflow.config.reference``."""
    parser = argparse.ArgumentParser(prog=GENERATOR, description="Write (or --check) docs/configuration.md "
                                     "and docs/cli.md.")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each stale page")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the docs folder (default: the repository's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.check:
        stale = stale_pages(args.docs)
        for path in stale:
            print(f"{path}: out of date; run `{GENERATOR}`", file=sys.stderr)
        return 1 if stale else 0
    for path in write_pages(args.docs):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
