"""README.md and docs/*.md against the code: every command they show names a real verb, options that verb's
`--help` lists, `make` targets the Makefile has and repository files that exist; pipeline files use known keys;
Python snippets import what exists; links (and their #anchors) resolve."""
from __future__ import annotations

import ast
import functools
import importlib
import re
import shlex
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO

DOCS = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
SHELL = {"bash", "sh", "shell", "console"}
REPO_DIRS = ("data", "bench", "docs", "tests", "pipeline", "stages", "cprd_pipeline")
PROJECT_PACKAGES = ("stages", "pipeline", "cprd_pipeline")
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


# ---------------------------------------------------------------- what the code offers

@functools.lru_cache(maxsize=None)
def verbs() -> tuple[str, ...]:
    from cprd_pipeline.cli import main

    return tuple(main.list_commands(click.Context(main)))


@functools.lru_cache(maxsize=None)
def help_text(verb: str | None) -> str:
    """`cprd-pipeline [VERB] --help`, as a user sees it."""
    from cprd_pipeline.cli import main

    result = CliRunner().invoke(main, ([verb] if verb else []) + ["--help"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@functools.lru_cache(maxsize=None)
def options(verb: str | None) -> frozenset[str]:
    """Every option spelling of the verb's command (the group's own for None), `--no-x` forms included."""
    from cprd_pipeline.cli import main

    cmd = main if verb is None else main.get_command(click.Context(main), verb)
    return frozenset(o for p in cmd.params for o in (*p.opts, *p.secondary_opts)) | {"--help", "-h"}


@functools.lru_cache(maxsize=None)
def make_targets() -> frozenset[str]:
    text = (REPO / "Makefile").read_text()
    return frozenset(m.group(1) for m in re.finditer(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M)
                     if not m.group(1).startswith("."))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*$", text, re.M)}


# ---------------------------------------------------------------- the checker

def command_lines(body: str) -> list[list[str]]:
    """Shell commands of a fenced block: continuations joined, comments dropped, split at && ; |."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        try:
            tokens = list(lexer)
        except ValueError as e:
            out.append(["<unparsable>", line, str(e)])
            continue
        part: list[str] = []
        for tok in tokens + [";"]:
            if tok in ("&&", "||", ";", "|"):
                if part:
                    out.append(part)
                part = []
            else:
                part.append(tok)
    return out


def check_tokens(tokens: list[str]) -> list[str]:
    """Problems with one command; an empty list for a command that is not this project's or is fine."""
    if tokens and tokens[0] == "<unparsable>":
        return [f"cannot parse {tokens[1]!r}: {tokens[2]}"]
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):   # FOO=bar cmd ...
        tokens = tokens[1:]
    if not tokens:
        return []
    problems = []
    if tokens[0] == "make":
        for t in tokens[1:]:
            if not t.startswith("-") and "=" not in t and t not in make_targets():
                problems.append(f"make {t}: no such target in the Makefile")
        return problems
    if tokens[0] == "cprd-pipeline" or tokens[0].endswith("/cprd-pipeline"):
        rest = tokens[1:]
    elif "-m" in tokens and tokens.index("-m") + 1 < len(tokens) and \
            tokens[tokens.index("-m") + 1] in ("cprd_pipeline", "cprd_pipeline.cli"):
        rest = tokens[tokens.index("-m") + 2:]
    else:
        return []
    shown = "cprd-pipeline " + " ".join(rest)
    verb = None
    if rest and not rest[0].startswith("-"):
        verb, rest = rest[0], rest[1:]
        if re.fullmatch(r"[A-Z_]+", verb):   # a placeholder: `cprd-pipeline VERB --help`
            return []
        if verb not in verbs():
            return [f"{shown}: no verb {verb!r} (verbs: {', '.join(verbs())})"]
    for tok in rest:
        if tok.startswith("-") and tok not in ("-", "--") and not re.fullmatch(r"-\d.*", tok):
            name = tok.split("=", 1)[0]
            if name not in options(verb):
                problems.append(f"{shown}: {name} is not an option of `cprd-pipeline {verb or ''}`")
            elif not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", help_text(verb)):
                problems.append(f"{shown}: {name} is not in `cprd-pipeline {verb or ''} --help`")
        else:
            problems += check_path(tok.split("=", 1)[-1], shown)
    return problems


def check_path(token: str, where: str) -> list[str]:
    token = token.rstrip(".,;:)")
    if not re.match(rf"^(\./)?({'|'.join(REPO_DIRS)})/", token) or "..." in token:
        return []
    hits = list(REPO.glob(token)) if any(c in token for c in "*?[") else [REPO / token]
    return [] if any(h.exists() for h in hits) else [f"{where}: {token} does not exist"]


def check_pipeline_file(data: object, where: str) -> list[str]:
    """A YAML block with a section per verb: every key an option of its verb, every shared key one of some verb."""
    if not isinstance(data, dict) or not any(k in verbs() for k in data):
        return []
    problems = []
    for key, value in data.items():
        if key in verbs():
            for k in (value or {}):
                flag = "--" + str(k).replace("_", "-")
                if flag not in options(key):
                    problems.append(f"{where}: `{key}: {k}` is not an option of `cprd-pipeline {key}`")
                if isinstance(value[k], str):
                    problems += check_path(value[k], where)
        elif not any("--" + str(key).replace("_", "-") in options(v) for v in verbs()):
            problems.append(f"{where}: top-level `{key}` is an option of no verb")
    return problems


def check_python(body: str, where: str) -> list[str]:
    try:
        tree = ast.parse(body)
    except SyntaxError as e:
        return [f"{where}: Python does not parse: {e}"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PROJECT_PACKAGES:
            module = importlib.import_module(node.module)
            problems += [f"{where}: `from {node.module} import {a.name}`: no such name"
                         for a in node.names if not hasattr(module, a.name)]
    return problems


def check_links(text: str, doc: Path) -> list[str]:
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", text)):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            problems.append(f"{doc.name}: link {target}: {file} does not exist")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            problems.append(f"{doc.name}: link {target}: no heading #{anchor} in {path.name}")
    return problems


def check_markdown(text: str, doc: Path) -> tuple[list[str], list[list[str]]]:
    """(problems, the project commands checked) of one markdown text: fenced shell, YAML and Python blocks,
    inline `cprd-pipeline ...`, `make ...`, `torchrun ... -m cprd_pipeline ...` and `VERB --option ...` spans, and
    links."""
    problems, checked = [], []
    for m in FENCE.finditer(text):
        lang, body = m.group(1).lower(), m.group(2)
        where = f"{doc.name}:{text[:m.start()].count(chr(10)) + 1}"
        if lang in SHELL or lang == "":   # an untagged block (a diagram, a tree): only its project commands
            for tokens in command_lines(body):
                if lang == "" and (not tokens or tokens[0] not in ("cprd-pipeline", "make")):
                    continue
                found = check_tokens(tokens)
                problems += [f"{where}: {p}" for p in found]
                checked.append(tokens)
        elif lang in ("yaml", "yml"):
            try:
                problems += check_pipeline_file(yaml.safe_load(body), where)
            except yaml.YAMLError as e:
                problems.append(f"{where}: YAML does not parse: {e}")
        elif lang in ("python", "py"):
            problems += check_python(body, where)
    for span in re.findall(r"`([^`]+)`", FENCE.sub("", text)):
        span = " ".join(span.split())
        if re.match(rf"^({'|'.join(map(re.escape, verbs()))}) --", span):   # `distill --loss kl`: a verb's options
            span = "cprd-pipeline " + span
        if re.match(r"^(cprd-pipeline|make|torchrun|accelerate launch|python -m cprd_pipeline) ", span):
            tokens = command_lines(span)
            for t in tokens:
                problems += [f"{doc.name}: `{span}`: {p}" for p in check_tokens(t)]
            checked += tokens
    problems += check_links(text, doc)
    return problems, [t for t in checked if t and t[0] in ("cprd-pipeline", "make")]


# ---------------------------------------------------------------- the tests

@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_option_file_key_import_and_link_exists(doc):
    problems, _ = check_markdown(doc.read_text(), doc)
    assert not problems, "\n".join(problems)


def test_the_readme_shows_the_two_setup_commands_and_the_pipeline():
    text = (REPO / "README.md").read_text()
    _, checked = check_markdown(text, REPO / "README.md")
    shown = {" ".join(t[:2]) for t in checked}
    assert {"make demo", "make test"} <= shown
    for verb in ("mine", "score-teacher", "distill", "evaluate", "loop", "status", "report"):
        assert f"cprd-pipeline {verb}" in shown, verb
    assert len(text.splitlines()) <= 210, "the README is the front door: keep it short, move detail to docs/"


BAD = """
```bash
cprd-pipeline distill --run runs/x --no-such-option 3
cprd-pipeline minee --run runs/x
cprd-pipeline demo --recipe data/no-such-recipe.yaml
make no-such-target
```

```yaml
mine: {k: 8, kk: 3}
colour: red
```

```python
from stages.mine import NoSuchConfig
```

Also `cprd-pipeline evaluate --k-tset 16`, `distill --lfit only` and [a link](docs/no-such-page.md), [an anchor](README.md#no-such-heading).
"""

GOOD = """
```bash
cprd-pipeline mine --run runs/x --data a.json --student s --k 8 --no-trust-remote-code   # a comment --bogus
cprd-pipeline distill --run=runs/x --lift only --frozen-negatives && make test
CUDA_VISIBLE_DEVICES=0 torchrun --nproc_per_node 2 -m cprd_pipeline mine --run-dir runs/x ...
cprd-pipeline demo --recipe data/demo-transfer.yaml; cprd-pipeline VERB --help
```

```yaml
device: cpu
distill: {loss: kl, teacher-temperature: 30, num_negatives: 8}
```
"""


def test_the_checker_finds_made_up_commands_keys_imports_and_links():
    problems, _ = check_markdown(BAD, REPO / "README.md")
    text = "\n".join(problems)
    for expected in ("--no-such-option is not an option of `cprd-pipeline distill`", "no verb 'minee'",
                     "data/no-such-recipe.yaml does not exist", "make no-such-target: no such target",
                     "`mine: kk` is not an option", "top-level `colour`", "import NoSuchConfig`: no such name",
                     "--k-tset is not an option of `cprd-pipeline evaluate`",
                     "--lfit is not an option of `cprd-pipeline distill`", "docs/no-such-page.md does not exist",
                     "no heading #no-such-heading"):
        assert expected in text, f"{expected!r} not found in:\n{text}"
    assert len(problems) == 11, text


def test_the_checker_passes_real_commands_in_every_spelling():
    problems, checked = check_markdown(GOOD, REPO / "README.md")
    assert problems == []
    assert len(checked) == 5   # the torchrun line is checked too, but is not a cprd-pipeline/make line


def test_anchor_slugs_follow_github():
    assert slug("Losses (`pipeline/losses/`, `distill --loss`)") == "losses-pipelinelosses-distill---loss"
    assert slug("LoopITR's loop: `train-teacher` and `loop`") == "loopitrs-loop-train-teacher-and-loop"
