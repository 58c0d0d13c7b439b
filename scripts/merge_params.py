#!/usr/bin/env python
"""Add a params fragment (e.g. examples/own_corpora.yaml) to params.yaml, as text, keeping every
comment and line of params.yaml as it is:

    python scripts/merge_params.py examples/own_corpora.yaml

A mapping's new entries (corpora, runs) are inserted at the end of that mapping's block, in the
fragment's own style; a one-line list (``download.corpora: [...]``) gets the new items appended.
A name params.yaml already has is an error (a corpus or run colliding with a built-in). The
result is checked (it must parse, and the corpora must validate) before params.yaml is replaced.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from pathlib import Path

import yaml
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """Index after the last line of the block whose key line is ``start`` (indentation ``indent``);
    comment lines just before the next key belong to that key."""
    end = start + 1
    for i in range(start + 1, len(lines)):
        text = lines[i]
        if text.strip() and not text.lstrip().startswith("#") and len(text) - len(text.lstrip()) <= indent:
            break
        if text.strip() and not text.lstrip().startswith("#"):
            end = i + 1
    return end


def _find_key(lines: list[str], path: list[str]) -> tuple[int, int]:
    """(line index, indentation) of the key at ``path`` (block style down to it)."""
    lo, hi, indent = 0, len(lines), -1
    for key in path:
        pattern = re.compile(rf"^(\s*){re.escape(key)}:(\s|$)")
        for i in range(lo, hi):
            m = pattern.match(lines[i])
            if m and len(m.group(1)) > indent:
                indent = len(m.group(1))
                lo, hi = i, _block_end(lines, i, indent)
                break
        else:
            raise SystemExit(f"params.yaml: no key {'.'.join(path)} to add to")
    return lo, indent


def merge(lines: list[str], base: dict, extra: dict, path: list[str]) -> None:
    for key, value in extra.items():
        where = [*path, key]
        name = ".".join(map(str, where))
        if key not in base:
            line, indent = _find_key(lines, path)
            rt = YAML()
            rt.width = 110
            out = io.StringIO()
            rt.dump({key: value}, out)
            pad = " " * (indent + 2)
            block = [pad + t if t.strip() else t for t in out.getvalue().splitlines(keepends=True)]
            at = _block_end(lines, line, indent)
            lines[at:at] = block
        elif path and path[-1] in ("corpora", "runs") and isinstance(base[key], dict):
            raise SystemExit(f"{name}: params.yaml already declares {key!r} (a built-in?); pick another name")
        elif isinstance(value, dict) and isinstance(base[key], dict):
            merge(lines, base[key], value, where)
        elif isinstance(value, list) and isinstance(base[key], list):
            new = [v for v in value if v not in base[key]]
            line, _ = _find_key(lines, where)
            if not new:
                continue
            if not lines[line].rstrip().split("#")[0].rstrip().endswith("]"):
                raise SystemExit(f"{name}: expected a one-line list [...] in params.yaml")
            head, _, rest = lines[line].partition("]")
            lines[line] = head + ", " + ", ".join(map(str, new)) + "]" + rest
        elif base[key] != value:
            raise SystemExit(f"{name}: the fragment changes {base[key]!r} to {value!r}; edit params.yaml instead")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fragment", type=Path)
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    args = ap.parse_args()
    text = args.params.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    merge(lines, yaml.safe_load(text), YAML().load(args.fragment.read_text(encoding="utf-8")), [])
    tmp = args.params.with_name(args.params.name + ".new")
    tmp.write_text("".join(lines), encoding="utf-8")
    try:
        from rnnlab.config import load_params
        from rnnlab.data.corpora import load_corpora

        load_corpora(load_params(tmp))
    except BaseException:
        tmp.unlink()
        raise
    tmp.replace(args.params)
    print(f"{args.params}: added {args.fragment}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
