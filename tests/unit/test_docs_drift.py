"""The hand-written docs against the code: a doc that drifts fails here, naming the doc, the
line and the thing it names that does not exist. Checked in README.md, tests/README.md,
k8s/README.md and docs/*.md (less the pages the benchmarks write): `tsfleet <command> --flag`
against the CLI's parser, `make <target>`, `python -m <module>` (found, never imported), ports
named as listeners, metric names, fleet.yaml keys, repo paths in backticks, relative links."""
from __future__ import annotations

import argparse
import functools
import importlib.util
import re
from pathlib import Path
from unittest import mock

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("benchmarks", "soak.md", "gpu-box.md", "isolation.md")  # written by benchmarks/
DOCS = sorted([ROOT / "README.md", ROOT / "tests" / "README.md", ROOT / "k8s" / "README.md"]
              + [p for p in (ROOT / "docs").glob("*.md") if not p.name.startswith(GENERATED)])
NAMED = {"models", "workflows", "versions"}  # their children are names, not keys
EXTENSIONS = (".py", ".md", ".yaml", ".yml", ".json", ".properties", ".sh", ".txt", ".proto", ".toml", ".xml", ".png")
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _words(*globs: str) -> set[str]:
    return {w for g in globs for p in ROOT.glob(g) for w in WORD.findall(p.read_text())}


@functools.cache
def parser() -> argparse.ArgumentParser:
    """The CLI's parser: tsfleet.cli.build_parser() where it exists, else the one main() builds."""
    from tsfleet import cli
    if callable(getattr(cli, "build_parser", None)):
        return cli.build_parser()

    class Built(Exception):
        pass

    def grab(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise Built(self)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab), pytest.raises(Built) as built:
        cli.main([])
    return built.value.args[0]


def commands() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


@functools.cache
def known() -> dict[str, set]:
    """What the code and config define: make targets, ports, metrics, manifest keys, ignored paths."""
    props = (ROOT / "config.properties").read_text()  # its listeners, TorchServe's defaults, the CLI's
    ports = {int(p) for p in re.findall(r"^\w+_(?:address|port)=\S*?(\d{4,5})$", props, re.M)}
    from tsfleet.build.properties import Endpoints
    ports |= {v for v in vars(Endpoints()).values() if isinstance(v, int)}
    for p in [parser(), *commands().values()]:
        for a in p._actions:
            if isinstance(a.default, int) and "port" in a.dest:
                ports.add(a.default)
            ports |= {int(n) for n in re.findall(r":(\d{4,5})\b", str(a.default))}
    ports |= {int(p) for p in re.findall(r"(?:containerPort|port|targetPort):\s*(\d+)",
                                         " ".join(p.read_text() for p in ROOT.glob("k8s/**/*.yaml")))}
    code = " ".join(p.read_text() for g in ("tsfleet/**/*.py", "handlers/**/*.py", "k8s/**/*.yaml") for p in ROOT.glob(g))
    metrics = set(re.findall(r"\b(?:tsfleet|ts)_[a-z0-9_]+", code)) | set(re.findall(r"\bHandler[A-Z]\w*", code))
    spec = importlib.util.find_spec("ts")  # TorchServe's own metric names (found, not imported)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / "configs" / "metrics.yaml").is_file():
            metrics |= set(WORD.findall((Path(loc) / "configs" / "metrics.yaml").read_text()))
    fleet = (ROOT / "fleet.yaml").read_text()
    keys = set(re.findall(r"^\s*#?\s*([a-z_]+):", fleet, re.M)) | set(yaml_keys(yaml.safe_load(fleet))) | _words(
        "tsfleet/manifest*.py", "tsfleet/manifest/**/*.py", "tsfleet/router/wire/limits.py", "handlers/config.py")
    keys |= {w for p in ROOT.glob("handlers/*.py") if "OPTIONS =" in p.read_text() for w in WORD.findall(p.read_text())}
    targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))
    ignored = {line.strip("/*") for line in (ROOT / ".gitignore").read_text().split() if line.startswith("/")}
    return {"ports": ports, "metrics": metrics, "keys": keys, "targets": targets, "ignored": ignored}


def yaml_keys(node: object, parent: str = "") -> list[str]:
    """Every key of a parsed YAML document, less the names under NAMED (models, versions ...)."""
    if isinstance(node, list):
        return [k for item in node for k in yaml_keys(item, parent)]
    if not isinstance(node, dict):
        return []
    found = [str(key) for key in node if parent not in NAMED]
    return found + [k for key, value in node.items() for k in yaml_keys(value, "" if parent in NAMED else str(key))]


def module_found(name: str) -> bool:
    """Whether `python -m name` finds something to run, importing nothing."""
    first, *rest = name.split(".")
    if (ROOT / first / "__init__.py").is_file():
        places = [ROOT / first]
    else:
        spec = importlib.util.find_spec(first)
        if spec is None:
            return False
        places = [Path(p) for p in spec.submodule_search_locations or []]
        if not rest:
            return not places or any((p / "__main__.py").is_file() for p in places)
    for i, part in enumerate(rest):
        if i == len(rest) - 1 and any((p / f"{part}.py").is_file() for p in places):
            return True
        places = [p / part for p in places if (p / part / "__init__.py").is_file()]
    return any((p / "__main__.py").is_file() for p in places)


def slugs(text: str) -> set[str]:
    """The anchors of a markdown text's headings, as GitHub makes them."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def check_command(line: int, text: str) -> list[str]:
    """`tsfleet [global flags] COMMAND [ACTION] [--flags]` in one command line or code span."""
    found = []
    for m in re.finditer(r"(?:^|(?<=[\s/(`$]))tsfleet\s+(.*)", text):
        before = text[:m.start()]  # `.venv/bin/tsfleet`, not `deploy/tsfleet` nor `-n tsfleet`
        if before.endswith("/") and not before.endswith("bin/") or (before.split() or [""])[-1].startswith("-"):
            continue
        words = re.split(r"\s+", re.split(r"\s(?:[|;#>)]|&&)", m.group(1))[0].strip())
        top = parser()._option_string_actions
        while words and words[0].startswith("-"):
            flag = words.pop(0).split("=")[0]
            if flag not in top:
                found.append(f"{line}: `tsfleet {flag}`: no such option")
            elif top[flag].nargs != 0 and "=" not in flag and words:
                words.pop(0)
        if not words or not re.fullmatch(r"[a-z][\w-]*", words[0]):
            continue
        name, rest = words[0], words[1:]
        if name not in commands():
            found.append(f"{line}: `tsfleet {name}`: no such command")
            continue
        sub = commands()[name]
        choices = next((a.choices for a in sub._actions if not a.option_strings and a.choices), None)
        plain = [w for w in rest if re.fullmatch(r"[a-z][a-z|-]*", w)]
        if choices and plain and plain[0] == rest[0]:
            found += [f"{line}: `tsfleet {name} {c}`: no such action" for c in plain[0].split("|") if c not in choices]
        for word in rest:
            flag = word.strip("[],.;:)").split("=")[0]
            if re.fullmatch(r"--?[a-zA-Z][\w-]*", flag) and flag not in sub._option_string_actions:
                found.append(f"{line}: `tsfleet {name} {flag}`: no such option")
    return found


def check(doc: Path, text: str) -> list[str]:
    """Every problem of one doc's text, as `DOC:LINE: what`."""
    k, lines, problems = known(), text.split("\n"), []
    blocks, inside, start, lang = [], False, 0, ""
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            if inside:
                blocks.append((start, lang, lines[start:i]))
            inside, start, lang = not inside, i + 1, line.strip()[3:].strip()
    prose = list(lines)
    for start, _, body in blocks:
        prose[start - 1:start + len(body) + 1] = [""] * (len(body) + 2)
    prose_text = "\n".join(prose)
    spans = [(prose_text.count("\n", 0, m.start()) + 1, m.group(1).replace("\n", " "))
             for m in re.finditer(r"(?<!`)`([^`]{1,300})`(?!`)", prose_text)]
    code = spans + [(start + 1 + j, l) for start, _, body in blocks for j, l in enumerate(body)]
    for line, piece in code:
        problems += check_command(line, piece)
        problems += [f"{line}: `make {t}`: no such target in the Makefile"
                     for t in re.findall(r"(?:^|(?<=[\s(;&|]))make\s+([a-z][\w-]*)", piece) if t not in k["targets"]]
        problems += [f"{line}: `python -m {mod}`: no such module" for mod in
                     re.findall(r"python[\d.]*\s+-m\s+([\w.]+)", piece) if not module_found(mod)]
    port_table = False  # a table whose header names ports: its numbers are ports
    for i, line in enumerate(lines, 1):
        if line.startswith("|") and not (i > 1 and lines[i - 2].startswith("|")):
            port_table = bool(re.search(r"\bport", line, re.I))
        for m in re.finditer(r"(?<![\w.-])(\d{4,5})(?!\w|\.\d)", line):
            port, before = int(m.group(1)), line[:m.start()]
            as_port = re.search(r"(\d{1,3}(\.\d{1,3}){3}|localhost|\]|[a-z][\w-]*\.[\w.-]+):$", before) or \
                re.search(r"\bport", before, re.I) or port_table and line.startswith("|")
            if as_port and 1024 <= port <= 65535 and port not in k["ports"]:
                problems.append(f"{i}: port {port}: no listener of the code or config.properties")
        for m in re.finditer(r"(?<![\w/.-])((?:tsfleet|ts)_[a-z0-9_]*[a-z0-9]|Handler[A-Z]\w*)(?![\w/(-]|\.[a-z])", line):
            name = m.group(1)
            if name not in k["metrics"] and re.sub(r"_(bucket|sum|count)$", "", name) not in k["metrics"]:
                problems.append(f"{i}: metric `{name}`: not in the code nor TorchServe's metric names")
    for start, lang, body in blocks:
        if lang not in ("yaml", "yml") or not any(re.match(r"(defaults|models|workflows|router):", l) for l in body):
            continue
        try:
            tree = yaml.safe_load("\n".join(body))
        except yaml.YAMLError as exc:
            problems.append(f"{start + 1}: a fleet.yaml excerpt that does not parse: {exc}")
            continue
        problems += [f"{start + 1}: fleet.yaml key `{key}`: not in fleet.yaml nor the manifest's code"
                     for key in dict.fromkeys(yaml_keys(tree)) if key not in k["keys"]]
    if doc.name == "manifest.md":
        for line, span in spans:
            m = re.fullmatch(r"([a-z][a-z0-9_]*(?:\.[a-z<][\w<>-]*)*)(:.*)?", span)
            if not m or "." + m.group(1).rsplit(".", 1)[-1] in EXTENSIONS or not (
                    m.group(2) or "." in m.group(1) or "_" in m.group(1)):
                continue
            problems += [f"{line}: fleet.yaml key `{part}`: not in fleet.yaml nor the manifest's code"
                         for part in m.group(1).split(".") if not re.search(r"[<-]", part) and part not in k["keys"]]
    tracked = {p.name for p in ROOT.iterdir()} - k["ignored"] - {".venv", ".venv-k8s"}
    dirs = "|".join(re.escape(d.name) for d in ROOT.iterdir() if d.is_dir() and d.name in tracked)
    in_blocks = [(start + 1 + j, m) for start, _, body in blocks for j, l in enumerate(body)  # paths in diagrams
                 for m in re.findall(rf"(?<![\w./@-])(?:{dirs})/[\w./-]*[\w/]", l)]
    for line, span in spans + in_blocks:
        path = span.strip().split("::")[0].rstrip("/")
        if "/" not in path or not re.fullmatch(r"[\w.][\w./-]*", path) or path.startswith(("./", "..")) \
                or path.split("/")[0] in k["ignored"]:
            continue
        if (path.split("/")[0] in tracked or path.endswith(EXTENSIONS)) and not (
                (ROOT / path).exists() or (doc.parent / path).exists()):
            problems.append(f"{line}: `{path}`: no such file in the repo")
    for m in re.finditer(r"\]\(([^)\s#]*)(?:#([^)\s]*))?\)", prose_text):
        line, target, anchor = prose_text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)
        if re.match(r"[a-z]+:", target):
            continue
        path = (doc.parent / target).resolve()
        if target and not path.exists():
            problems.append(f"{line}: link to {target}: no such file")
        elif anchor and (not target or path.suffix == ".md") and anchor not in slugs(path.read_text() if target else text):
            problems.append(f"{line}: link to {target}#{anchor}: no such section")
    return [f"{doc.relative_to(ROOT)}:{p}" for p in problems]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_doc_names_only_what_exists(doc: Path) -> None:
    problems = check(doc, doc.read_text())
    assert not problems, "\n".join(problems)


def test_the_checker_reports_each_made_up_thing_at_its_line() -> None:
    text = "\n".join([
        "Run `tsfleet frobnicate`, then `tsfleet status --frob` and `tsfleet rollout jump m 1.1`.",  # 1
        "```bash", "make no-such-target", "python -m tsfleet.no_such_module", "```",  # 2-5
        "The router listens on port 8093 and serves `tsfleet_router_made_up_total`.",  # 6
        "```yaml", "models:", "  m:", "    serving: {batch_sighs: 8}", "```",  # 7-11
        "See `tsfleet/control/nowhere.py`, [gone](gone.md) and [here](#no-such-section).",  # 12
        "| what | port |", "|---|---|", "| REST | 8094 |"])  # 13-15
    problems = check(ROOT / "docs" / "made-up.md", text)
    for line, thing in [(1, "tsfleet frobnicate"), (1, "--frob"), (1, "rollout jump"), (3, "no-such-target"),
                        (4, "tsfleet.no_such_module"), (6, "8093"), (6, "tsfleet_router_made_up_total"),
                        (8, "batch_sighs"), (12, "nowhere.py"), (12, "gone.md"), (12, "no-such-section"), (15, "8094")]:
        assert any(p.startswith(f"docs/made-up.md:{line}: ") and thing in p for p in problems), (line, thing, problems)
    assert len(problems) == 12, problems


def test_the_checker_passes_what_exists() -> None:
    text = ("`tsfleet --router-admin http://127.0.0.1:8091 rollout start intent-classifier 1.1 --weight 5`, "
            "`make test`, `python -m tsfleet.router.wire.limits`, port 8090, `tsfleet_router_requests_total`, "
            "`handlers/base.py`, [router](router.md#router-limits)\n```yaml\nmodels:\n  m:\n    recycle: "
            "{max_rss_mb: 2048}\n```")
    assert check(ROOT / "docs" / "made-up.md", text) == []
