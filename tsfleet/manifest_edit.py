"""Small, comment-preserving edits of fleet.yaml (the file people read and review)."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from tsfleet.errors import ManifestError
from tsfleet.files import write_atomically
from tsfleet.manifest.read import in_file, parse_fleet

_VALUE = re.compile(r"""^(?P<head>\s*default_version:\s*)(?P<value>"[^"]*"|'[^']*'|[^\s#]+)(?P<tail>.*)$""")


def set_default_version(path: Path, model: str, version: str) -> bool:
    """Make ``version`` the default of ``model`` in the manifest at ``path``, keeping every
    other line (comments included) as it is. False if it already was; ManifestError if the
    file's layout is one this edit cannot follow (the file is then left untouched)."""
    lines = Path(path).read_text().splitlines(keepends=True)
    block = next((i for i, line in enumerate(lines) if re.match(rf"^(\s+){re.escape(model)}:\s*(#.*)?$", line)), None)
    if block is None:
        raise ManifestError(f"{path}: cannot find the block of model {model}")
    indent = len(lines[block]) - len(lines[block].lstrip())
    end = next((j for j in range(block + 1, len(lines))
                if lines[j].strip() and not lines[j].lstrip().startswith("#")
                and len(lines[j]) - len(lines[j].lstrip()) <= indent), len(lines))
    child = next((len(lines[j]) - len(lines[j].lstrip()) for j in range(block + 1, end) if lines[j].strip()), indent + 2)
    new = list(lines)
    for j in range(block + 1, end):
        m = _VALUE.match(lines[j].rstrip("\n"))
        if m and len(lines[j]) - len(lines[j].lstrip()) == child:
            if m["value"].strip("\"'") == version:
                return False
            new[j] = f'{m["head"]}"{version}"{m["tail"]}\n'
            break
    else:
        new.insert(block + 1, f'{" " * child}default_version: "{version}"\n')
    text = "".join(new)
    try:  # still a valid manifest?
        fleet = parse_fleet(yaml.safe_load(text), Path(path).resolve().parent)
    except ManifestError as exc:
        raise in_file(path, exc) from None
    if fleet.models[model].default_version != version:
        raise ManifestError(f"{path}: editing default_version of {model} did not take; edit it by hand")
    write_atomically(path, text)
    return True
