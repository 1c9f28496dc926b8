"""The README and docs/ against the tool: every command they show exists, every relative link resolves.

What is read: README.md and docs/*.md. Commands are the lines of their fenced ```bash (or sh, shell, console)
blocks, continuation lines joined, split at `&&`, `||`, `;` and `|` (a `|` inside `[...]` is an alternative of a
usage line, not a pipe). Each command is checked by its program:

- `specrt SUB ...` or `python -m specrt.cli SUB ...`: SUB (and `trace`'s own subcommand) exists, `--help` of it
  exits 0, and every `--option` shown is one of its options;
- `make TARGET ...`: every TARGET is a target of the Makefile;
- `python[3] PATH.py ...`: the file exists, its `--help` exits 0 and names every `--option` shown;
- `python[3] -m MODULE`: MODULE is one of PYTHON_MODULES;
- `bash PATH`: the file exists;
- any other program must be named in EXTERNAL, so a new kind of command is a decision, not an accident.

**GPU-only commands** end with the comment `# GPU only`: they are only checked to exist (the script file; the
subcommand and its options, read from the parser), never run, not even `--help`.

Links: every relative `[text](target)` and `![alt](target)` outside code resolves to a file or folder, and a
`#anchor` names a heading of the page it points to (GitHub's heading ids).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*DOCS, ROOT / "engines" / "FORMAT.md", ROOT / "SECURITY.md"]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
GPU_ONLY = re.compile(r"#\s*GPU only\b", re.IGNORECASE)
EXTERNAL = {"pip", "curl", "ray", "git", "cd", "export", "nvidia-smi"}
PYTHON_MODULES = {"pytest", "ruff", "pip", "venv"}
SEPARATORS = {"&&", "||", ";", "|"}
OPTION = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
FENCE = re.compile(r"^(\s*)(```|~~~)\s*([\w+-]*)[^\n]*\n(.*?)^\1\2\s*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


# -- commands ---------------------------------------------------------------------------------------------------


def shell_commands(text: str) -> list[tuple[str, list[str], bool]]:
    """(the line as written, one command's words, GPU-only?) for every command in the shell blocks of ``text``."""
    out = []
    for m in FENCE.finditer(text):
        if m.group(3).lower() not in SHELL_LANGS:
            continue
        for line in re.sub(r"\\\n\s*", " ", m.group(4)).splitlines():
            line = line.strip().removeprefix("$ ")
            if not line or line.startswith("#"):
                continue
            code, comment = _split_comment(line)
            gpu = bool(GPU_ONLY.search(comment))
            try:
                words = shlex.split(code)
            except ValueError as e:
                out.append((line, [f"<unparsable: {e}>"], gpu))
                continue
            depth, command = 0, []
            for w in words:
                if w in SEPARATORS and depth == 0:
                    if command:
                        out.append((line, command, gpu))
                    command = []
                    continue
                depth += w.count("[") - w.count("]")
                command.append(w)
            if command:
                out.append((line, command, gpu))
    return out


def _split_comment(line: str) -> tuple[str, str]:
    """(code, comment): a comment starts at an unquoted `#` that begins a word, as in bash."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote and not (quote == '"' and line[i - 1] == "\\") else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i:]
    return line, ""


@functools.cache
def _parser() -> argparse.ArgumentParser:
    from specrt.cli import build_parser

    return build_parser()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


@functools.cache
def _help_exits_0(path: tuple[str, ...]) -> bool:
    from specrt.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main([*path, "--help"])
        except SystemExit as e:
            return e.code == 0
    return False


def check_specrt(args: list[str], gpu: bool) -> list[str]:
    parser, path = _parser(), []
    rest = list(args)
    while True:
        subs = _subparsers(parser)
        if not subs:
            break
        while rest and rest[0].startswith("-"):  # options before the subcommand: --help, --version, -v
            rest.pop(0)
        if not rest:
            if path or not any(a in ("--help", "-h", "--version") for a in args):
                return [f"`specrt {' '.join(path)}` needs a subcommand: one of {', '.join(subs)}"]
            break
        if rest[0] not in subs:
            return [f"unknown subcommand `specrt {' '.join([*path, rest[0]])}`: specrt has {', '.join(subs)}"]
        path.append(rest.pop(0))
        parser = subs[path[-1]]
    problems = []
    known = set(_parser()._option_string_actions)
    for i in range(len(path)):  # the options of every parser on the way: `specrt -v trace analyze ...`
        p = _parser()
        for name in path[:i + 1]:
            p = _subparsers(p)[name]
        known |= set(p._option_string_actions)
    for word in args:
        for option in OPTION.findall(word):
            if option.split("=")[0] not in known:
                problems.append(f"`specrt {' '.join(path)}` has no option {option}")
    if not gpu and path and not _help_exits_0(tuple(path)):
        problems.append(f"`specrt {' '.join(path)} --help` does not exit 0")
    return problems


@functools.cache
def _script_help(script: str) -> tuple[int, str]:
    p = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       check=False)
    return p.returncode, p.stdout + p.stderr


def check_script(script: str, args: list[str], gpu: bool) -> list[str]:
    if not (ROOT / script).is_file():
        return [f"no such script: {script}"]
    if gpu:
        return []
    rc, text = _script_help(script)
    if rc != 0:
        return [f"`python {script} --help` exits {rc}: {text.strip()[-300:]}"]
    shown = {o for w in args for o in OPTION.findall(w)}
    return [f"`python {script}` has no option {o} (not in its --help)" for o in sorted(shown) if o not in text]


@functools.cache
def make_targets() -> frozenset[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_. -]+?)\s*:(?!=)", line)
        if m:
            targets.update(m.group(1).split())
    return frozenset(targets)


def check_command(words: list[str], gpu: bool) -> list[str]:
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):  # VAR=value before the program
        words = words[1:]
    if not words:
        return []
    prog, args = words[0], words[1:]
    if prog.startswith("<unparsable"):
        return [prog]
    if prog == "specrt":
        return check_specrt(args, gpu)
    if prog in ("python", "python3"):
        if args[:2] == ["-m", "specrt.cli"]:
            return check_specrt(args[2:], gpu)
        if args[:1] == ["-m"]:
            module = args[1] if len(args) > 1 else ""
            if module in PYTHON_MODULES:
                return []
            return [f"`python -m {module}`: not a module the docs may show (add it to PYTHON_MODULES in tests/test_docs.py)"]
        if args and args[0].endswith(".py"):
            return check_script(args[0], args[1:], gpu)
        return [f"`{' '.join(words)}`: python without a script or module"]
    if prog == "make":
        return [f"`make {t}`: no such target in the Makefile" for t in args
                if not t.startswith("-") and "=" not in t and t not in make_targets()]
    if prog in ("bash", "sh"):
        return [] if args and (ROOT / args[0]).is_file() else [f"no such script: {' '.join(args[:1])}"]
    if prog in EXTERNAL:
        return []
    problem = (f"`{prog}`: not a program the docs check knows (specrt, make, python, bash, or EXTERNAL in "
               "tests/test_docs.py); mark it `# GPU only` or name it there")
    return [problem]


def command_problems(text: str) -> list[str]:
    return [f"{line!r}: {p}" for line, words, gpu in shell_commands(text) for p in check_command(words, gpu)]


# -- links ------------------------------------------------------------------------------------------------------


def _without_code(text: str) -> str:
    text = FENCE.sub("", text)
    return re.sub(r"(`+).*?\1", "", text, flags=re.DOTALL)


def heading_ids(text: str) -> set[str]:
    """GitHub's ids of a page's headings: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    ids, seen = set(), {}
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", text), re.MULTILINE):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link's text only
        slug = "".join(c for c in title.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


def link_problems(text: str, page: Path) -> list[str]:
    problems = []
    for target in LINK.findall(_without_code(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve()
        if path and not dest.exists():
            problems.append(f"[...]({target}): {path} does not exist")
        elif anchor and (not path or dest.suffix == ".md"):
            ids = heading_ids(dest.read_text() if path else text)
            if anchor not in ids:
                problems.append(f"[...]({target}): no heading #{anchor} in "
                                f"{dest.relative_to(ROOT) if path else 'this page'}")
    return problems


# -- the documents ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_shown_exists(page):
    assert command_problems(page.read_text()) == []


@pytest.mark.parametrize("page", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert link_problems(page.read_text(), page) == []


def test_readme_is_short_and_starts_with_the_two_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    first = shell_commands(readme[readme.index("## Set-up"):])[:2]
    assert [w[:2] for _, w, _ in first] == [["make", "demo"], ["make", "test"]]
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.MULTILINE)
    top = readme[:readme.index("## Set-up")]
    assert "](engines/FORMAT.md)" in top  # the C/C++ reader finds the format before anything else


def test_docs_have_no_issue_bookkeeping():
    for page in DOCS:
        assert not re.search(r"\bissues? \d+", page.read_text(), re.IGNORECASE), page


# -- the check itself can fail ----------------------------------------------------------------------------------

SYNTHETIC = """# Title

See [the format](engines/FORMAT.md), [a section](#title), [gone](docs/no-such-page.md),
[no heading](docs/usage.md#no-such-heading) and [nowhere](#nowhere); `[in code](ignored.md)` is not a link.

```bash
specrt generate ./engine --prompt "hi" --k 4 && make demo
specrt frobnicate ./engine
specrt generate ./engine --no-such-flag
make no-such-target
python scripts/no_such_script.py --help
python benchmarks/kv_copy.py ENGINE --no-such-option
specrt build ./engine --lean   # GPU only
specrt build ./engine --no-gpu-flag   # GPU only
bash scripts/no_such_gpu_check.sh   # GPU only
frobnicate --all
```

```python
specrt frobnicate  # not a shell block: not a command
```
"""


def test_the_checks_catch_what_they_are_for():
    links = link_problems(SYNTHETIC, ROOT / "SYNTHETIC.md")
    assert len(links) == 3, links
    assert "docs/no-such-page.md does not exist" in links[0]
    assert "no heading #no-such-heading in docs/usage.md" in links[1] and "#nowhere" in links[2]
    commands = command_problems(SYNTHETIC)
    expected = ["unknown subcommand `specrt frobnicate`", "`specrt generate` has no option --no-such-flag",
                "`make no-such-target`: no such target", "no such script: scripts/no_such_script.py",
                "`python benchmarks/kv_copy.py` has no option --no-such-option",
                "`specrt build` has no option --no-gpu-flag", "no such script: scripts/no_such_gpu_check.sh",
                "`frobnicate`: not a program the docs check knows"]
    assert len(commands) == len(expected), commands
    for problem, want in zip(commands, expected):
        assert want in problem


def test_gpu_only_commands_are_not_run(monkeypatch):
    ran = []
    monkeypatch.setattr(sys.modules[__name__], "_script_help", lambda s: ran.append(s) or (1, ""))
    assert command_problems("```bash\npython benchmarks/trt_steps.py ENGINE   # GPU only\n```\n") == []
    assert ran == []
    assert command_problems("```bash\npython benchmarks/trt_steps.py ENGINE\n```\n") != [] and ran
