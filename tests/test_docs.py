"""The documentation cannot drift from the code (issue 22).

README.md and docs/*.md are read as a forge renders them, and checked without network:
the generated references are what `python -m alflow.config.reference` writes now; every
internal link and #anchor resolves (GitHub's heading slugs); every `toml` block parses and
loads with alflow's config loader; every `alflow ...` command in a `bash`/`sh`/`console`
block (and in inline code) names real commands and options of the `alflow` command tree,
and every `./dev.sh` line a real subcommand; every repository path and test named in
backticks exists, and every migration is listed in docs/architecture.md.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO

from alflow.config import load_config, reference

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)[^\n]*$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
REPO_PATH = re.compile(r"^(flows|tasks|connectors|config|benchmarks|deployments|tests|data|docs)/\S*$")
TEST_REF = re.compile(r"^(?:tests/)?(test_\w+\.py)?(?:::(\w+))?$")
SHELL_LANGS = {"bash", "sh", "shell", "console"}
DEV_SH = {"run", "test"}  # dev.sh's subcommands (its `case`); checked against the script below
SEPARATORS = {"&&", "||", ";", "|", "&"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
FRAGMENT_LABELS = 'labels = ["ham", "spam"]\n'


# -- reading Markdown as a forge does -------------------------------------------------------
def blocks(text: str) -> list[tuple[str, str, int]]:
    """Fenced code blocks: (language, body, line number of the opening fence)."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, lang, start, body = opening.group(2), opening.group(3).lower(), i + 1, []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        found.append((lang, "\n".join(body), start))
        i += 1
    return found


def prose(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(2)
        elif fence is not None and re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", line):
            fence = None
        elif fence is None:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its rendered text, lowercased, punctuation dropped,
    spaces as hyphens (github-slugger)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").replace("*", "").lower()
    return "".join(ch for ch in text if ch.isalnum() or ch in " -_").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every #anchor a forge gives ``path``: heading slugs (repeats numbered -1, -2, ...)
    and explicit <a id/name> anchors."""
    seen: Counter = Counter()
    found = set()
    for _, line in prose(path.read_text(encoding="utf-8")):
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            found.add(base if not seen[base] else f"{base}-{seen[base]}")
            seen[base] += 1
        found.update(HTML_ANCHOR.findall(line))
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link outside code."""
    out = []
    for number, line in prose(path.read_text(encoding="utf-8")):
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            out.append((number, target))
    return out


def broken_link(page: Path, target: str) -> str | None:
    """Why ``target`` (as written in ``page``) does not resolve, or None."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
        return None
    file_part, _, anchor = target.partition("#")
    linked = (page.parent / file_part).resolve() if file_part else page
    if not linked.exists():
        return f"{file_part} does not exist"
    if anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
        return f"#{anchor} is no heading of {linked.name}"
    return None


# -- commands -------------------------------------------------------------------------------
def command_lines(lang: str, body: str) -> list[str]:
    """The commands of a shell block: continuation lines joined; in a `console` block only
    the lines after a `$ ` prompt (the rest is output)."""
    joined = re.sub(r"\\\n\s*", " ", body)
    lines = joined.splitlines()
    if lang == "console":
        return [line.strip()[2:] for line in lines if line.strip().startswith("$ ")]
    return [line for line in lines if line.strip()]


def simple_commands(line: str) -> list[list[str]]:
    """A shell line as its simple commands (split at && ; | ...), comments and leading
    VAR=value assignments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    out = []
    for command in commands:
        while command and ENV_ASSIGNMENT.match(command[0]):
            command = command[1:]
        if command:
            out.append(command)
    return out


@functools.cache
def alflow_tree():
    """The `alflow` command as click objects (built once)."""
    return reference.command_tree()


def check_alflow(args: list[str], strict: bool = True) -> str | None:
    """Why ``alflow ARGS`` is not a command line the `alflow` tree accepts (at `--help`
    level: command names, option names, option values present, arguments counted, required
    options given when ``strict``), or None. Nothing is run."""
    command, path = alflow_tree(), ["alflow"]
    while getattr(command, "commands", None) and args and args[0] in command.commands:
        command, path = command.commands[args[0]], path + [args[0]]
        args = args[1:]
    where = " ".join(path)
    if getattr(command, "commands", None):
        if args and args[0] != "--help":
            return f"{where}: no command {args[0]!r} (has {', '.join(command.commands)})"
        return None
    options = {"--help": None}
    arguments, given = [], set()
    for param in command.params:
        if param.param_type_name == "argument":
            arguments.append(param)
        else:
            options.update({name: param for name in (*param.opts, *param.secondary_opts)})
    positional, i = 0, 0
    while i < len(args):
        token = args[i]
        if token.startswith("-") and token != "-":
            name, eq, _ = token.partition("=")
            if name not in options:
                return f"{where}: no option {name} (has {', '.join(sorted(options))})"
            param = options[name]
            if param is not None:
                given.add(param.name)
                if not param.is_flag and not eq:
                    if i + 1 >= len(args) and strict:
                        return f"{where}: {name} needs a value"
                    i += 1
        else:
            positional += 1
        i += 1
    if positional > len(arguments) and not any(a.nargs == -1 for a in arguments):
        return f"{where}: {positional} arguments given, it takes {len(arguments)}"
    if strict and "--help" not in args:
        missing = [p.opts[0] for p in command.params if p.required and p.param_type_name == "option"
                   and p.name not in given]
        missing += [p.name for p in arguments[positional:] if p.required]
        if missing:
            return f"{where}: {', '.join(missing)} required"
    return None


def check_command(argv: list[str], strict: bool = True) -> str | None:
    """Why a documented shell command is wrong, or None (commands other than alflow, ./dev.sh
    and the reference generator are not ours to check)."""
    program = Path(argv[0]).name
    if program == "alflow":
        return check_alflow(argv[1:], strict)
    if program == "dev.sh":
        if len(argv) < 2 or argv[1] not in DEV_SH:
            return f"dev.sh has no subcommand {argv[1:2]} (has {', '.join(sorted(DEV_SH))})"
        return check_alflow(["run", *argv[2:]], strict) if argv[1] == "run" else None
    if "alflow.config.reference" in argv:
        try:
            reference.build_parser().parse_args(argv[argv.index("alflow.config.reference") + 1:])
        except SystemExit:
            return f"python -m alflow.config.reference takes no {argv[argv.index('alflow.config.reference') + 1:]}"
    return None


# -- the tests ------------------------------------------------------------------------------
def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def test_the_generated_references_are_current():
    """docs/configuration.md and docs/cli.md are exactly what the generator writes now."""
    stale = reference.stale_pages(REPO / "docs")
    assert not stale, (f"{', '.join(page_id(p) for p in stale)} differ from the settings models / the alflow "
                       f"command: run `.venv/bin/python -m {reference.__name__}`")


def test_the_generator_writes_checks_and_names_a_stale_page(tmp_path):
    """`python -m alflow.config.reference --docs DIR` writes both pages; `--check` exits 0
    on them and 1 naming a page that was edited."""
    def generator(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "alflow.config.reference", "--docs", str(tmp_path), *args],
                              check=False, capture_output=True, text=True, timeout=120)

    written = generator()
    assert written.returncode == 0, written.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([reference.CONFIG_PAGE, reference.CLI_PAGE])
    assert generator("--check").returncode == 0
    page = tmp_path / reference.CONFIG_PAGE
    page.write_text(page.read_text(encoding="utf-8").replace("| `batch_size` | integer | `20`",
                                                            "| `batch_size` | integer | `25`"), encoding="utf-8")
    checked = generator("--check")
    assert checked.returncode == 1
    assert checked.stderr.strip() == f"{page}: out of date; run `{reference.GENERATOR}`"


def test_the_configuration_reference_lists_every_key_with_its_default_and_values():
    page = reference.configuration_page()
    from alflow.config.settings import Settings

    for name, field in Settings.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and hasattr(section, "model_fields"):
            assert f"## `[{name}]`" in page
            for key in section.model_fields:
                assert f"| `{key}` |" in page, f"{name}.{key}"
    for model in reference.source_models(Settings):
        assert f'### `type = "{reference._source_type(model)}"`' in page
    assert '| `strategy` | string | `"margin"` | `"least_confidence"`, `"margin"`,' in page
    assert "| `batch_size` | integer | `20` | ≥ 1, ≤ 500 | Items per review batch. |" in page
    assert "| `budget` | integer | unset | ≥ 1 |" in page
    assert "| `labels` | list of strings | required | at least 2 items |" in page
    assert '| `encoding` | string | `"utf-8"` |' in page  # the files source's key, documented


def test_a_key_without_a_description_is_named():
    from pydantic import BaseModel, Field

    class Undescribed(BaseModel):
        documented: int = Field(1, description="Has one.")
        bare: int = 2

    with pytest.raises(ValueError, match=r"^things\.bare: no description; add description= to its Field$"):
        reference.key_table(Undescribed, "things.")


def test_the_cli_reference_has_every_command_in_plain_text():
    page = reference.cli_page()
    for path, _command, _ctx in reference._contexts(reference.command_tree()):
        assert f"## `{' '.join(path)}`" in page
    assert "Usage: alflow simulate [OPTIONS]" in page
    assert not set("╭╮╰╯│─") & set(page)  # click's plain help, no rich panels
    assert "\\[" not in page  # rich escapes shown as a terminal shows them
    assert reference._rendered(r"Take \[model] from [bold]this[/] file") == "Take [model] from this file"
    assert max(len(line) for line in page.split("```text")[1].splitlines()) <= reference.HELP_WIDTH


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_internal_link_resolves(page):
    broken = [f"{page_id(page)}:{line}: {target}: {why}" for line, target in links(page)
              if (why := broken_link(page, target))]
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_toml_block_is_a_config_alflow_loads(page, tmp_path):
    import tomllib

    for lang, body, line in blocks(page.read_text(encoding="utf-8")):
        if lang != "toml":
            continue
        where = f"{page_id(page)}:{line}"
        try:
            data = tomllib.loads(body)
        except tomllib.TOMLDecodeError as exc:
            pytest.fail(f"{where}: not TOML: {exc}")
        config = tmp_path / f"line{line}" / "alflow.toml"
        config.parent.mkdir()
        config.write_text(body if "labels" in data else FRAGMENT_LABELS + body, encoding="utf-8")
        try:
            load_config(config, environ={})
        except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
            pytest.fail(f"{where}: alflow does not load it: {exc}")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_documented_command_exists(page):
    text = page.read_text(encoding="utf-8")
    wrong = []
    for lang, body, line in blocks(text):
        if lang in SHELL_LANGS:
            for command_line in command_lines(lang, body):
                for argv in simple_commands(command_line):
                    if why := check_command(argv):
                        wrong.append(f"{page_id(page)}:{line}: {command_line.strip()}: {why}")
    for line, prose_line in prose(text):
        for _, span in CODE_SPAN.findall(prose_line):
            if span.startswith(("alflow ", "./dev.sh ")):
                for argv in simple_commands(span):
                    if why := check_command(argv, strict=False):
                        wrong.append(f"{page_id(page)}:{line}: `{span}`: {why}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_path_and_test_named_exists(page):
    missing = []
    for line, prose_line in prose(page.read_text(encoding="utf-8")):
        test_file = None
        for _, span in CODE_SPAN.findall(prose_line):
            span = span.strip()
            if REPO_PATH.match(span) and not TEST_REF.match(span.removeprefix("tests/")):
                path = span.split(":", 1)[0]
                if not (any(REPO.glob(path)) if "*" in path else (REPO / path).exists()):
                    missing.append(f"{page_id(page)}:{line}: {span}")
                continue
            reference_ = TEST_REF.match(span)
            if not reference_ or not (reference_.group(1) or reference_.group(2)):
                continue
            test_file = reference_.group(1) or test_file
            source = REPO / "tests" / test_file if test_file else None
            if source is None or not source.is_file():
                missing.append(f"{page_id(page)}:{line}: {span} (no such test file)")
            elif reference_.group(2) and not re.search(rf"^\s*(async )?def {reference_.group(2)}\(",
                                                         source.read_text(encoding="utf-8"), re.MULTILINE):
                missing.append(f"{page_id(page)}:{line}: {span} (no such test in {test_file})")
    assert not missing, "\n".join(missing)


def table_rows(text: str) -> list[tuple[int, int]]:
    """(line, cells) of every Markdown table row outside code, pipes escaped as \\| kept."""
    return [(line, len(re.split(r"(?<!\\)\|", row.strip().strip("|"))))
            for line, row in prose(text) if row.lstrip().startswith("|")]


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_table_row_has_its_header_s_columns(page):
    """A stray | (a pipe in a cell, unescaped) shifts a forge's table: every row has as many
    cells as the header row of its table."""
    wrong, header, previous = [], None, None
    for line, cells in table_rows(page.read_text(encoding="utf-8")):
        if previous is None or line != previous + 1:
            header = cells  # a new table
        elif cells != header:
            wrong.append(f"{page_id(page)}:{line}: {cells} cells, the header has {header}")
        previous = line
    assert not wrong, "\n".join(wrong)


def test_every_migration_is_in_the_data_model_page():
    page = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    migrations = sorted((REPO / "tasks" / "store" / "migrations").glob("*.sql"))
    assert migrations
    missing = [m.name for m in migrations if f"`{m.name}`" not in page]
    assert not missing, f"docs/architecture.md#migrations does not list {missing}"


def test_dev_sh_has_the_subcommands_the_docs_check_against():
    script = (REPO / "dev.sh").read_text(encoding="utf-8")
    cases = set(re.findall(r"^\s{4}(\w+)\)$", script, re.MULTILINE))
    assert cases == DEV_SH


def test_the_checks_catch_what_they_are_for(tmp_path):
    """Each check fails on the mistake it exists for (so none passes for nothing)."""
    assert check_command(["alflow", "run", "--auto", "--cycles", "5"]) is None
    assert "no command 'lable'" in check_command(["alflow", "lable"])
    assert "no option --cycle" in check_command(["alflow", "run", "--cycle", "5"])
    assert "--cycles needs a value" in check_command(["alflow", "run", "--cycles"])
    assert "--data, --out required" in check_command(["alflow", "simulate"])
    assert "1 arguments given, it takes 0" in check_command(["alflow", "status", "extra"])
    assert "no command 'stat'" in check_command(["alflow", "server", "stat"])
    assert check_command(["./dev.sh", "test", "-m", "not slow"]) is None
    assert "no subcommand" in check_command(["./dev.sh", "bench"])
    assert "no option --cycle" in check_command(["./dev.sh", "run", "--cycle", "2"])
    assert simple_commands('ALFLOW_X="a b" alflow init . && alflow run --auto  # demo') == \
        [["alflow", "init", "."], ["alflow", "run", "--auto"]]

    page = tmp_path / "page.md"
    page.write_text("# Top\n\n## Two `words`, here\n\nSee [x](#two-words-here), [y](#nowhere), [z](other.md).\n",
                    encoding="utf-8")
    assert anchors(page) == {"top", "two-words-here"}
    assert [broken_link(page, t) for _, t in links(page)] == [
        None, "#nowhere is no heading of page.md", "other.md does not exist"]
    assert broken_link(page, "https://example.org/#nowhere") is None
    assert table_rows("| a | b |\n|---|---|\n| `x\\|y` | z |\n| 1 | 2 | 3 |\n") == [(1, 2), (2, 2), (3, 2), (4, 3)]
