#!/usr/bin/env python3
"""Regenerates the flag tables of README.md's "Configuration" section from the binaries' --help.

Usage: cargo build --workspace --bins && python3 scripts/config_reference.py
The tables sit between the BEGIN/END markers; tests/it/readme.rs fails when a flag's environment
variable or a command is missing from the README.
"""
import json
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- BEGIN FLAGS (scripts/config_reference.py) -->", "<!-- END FLAGS -->"


def help_text(binary, path):
    return subprocess.run([binary, *path, "--help"], capture_output=True, text=True, check=True).stdout


def subcommands(text):
    out, inside = [], False
    for line in text.splitlines():
        if line.startswith("Commands:"):
            inside = True
            continue
        if inside:
            if not line.startswith("  "):
                break
            name = line.split()[0]
            if name != "help":
                out.append(name)
    return out


def options(text):
    rows, cur = [], None
    for line in text.splitlines():
        m = re.match(r"^\s{2,6}(-\w, )?(--[\w-]+)( <[^>]+>)?", line)
        if m and line.strip().startswith("-"):
            if cur:
                rows.append(cur)
            cur = {"flag": m.group(2) + (m.group(3) or ""), "env": "", "default": "", "desc": []}
            rest = line[m.end():].strip()
            if rest:
                cur["desc"].append(rest)
            continue
        if cur is None or not line.strip():
            continue
        s = line.strip()
        env = re.search(r"\[env: ([A-Z0-9_]+)", s)
        default = re.search(r"\[default: ([^\]]*)\]", s)
        values = re.search(r"\[possible values: ([^\]]*)\]", s)
        if env:
            cur["env"] = env.group(1)
        if default:
            cur["default"] = default.group(1)
        # Text before clap's bracketed notes is part of the description.
        rest = re.sub(r"\s*\[(env|default|possible values): [^\]]*\]", "", s).strip()
        if rest:
            cur["desc"].append(rest)
        if values:
            cur["desc"].append("(one of: " + values.group(1) + ")")
    if cur:
        rows.append(cur)
    return [r for r in rows if r["flag"] not in ("--help", "--version")]


def table(rows):
    out = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for r in rows:
        desc = " ".join(r["desc"]).replace("|", "\\|")
        env = f"`{r['env']}`" if r["env"] else ""
        default = f"`{r['default']}`" if r["default"] else ""
        out.append(f"| `{r['flag']}` | {env} | {default} | {desc} |")
    return "\n".join(out)


def walk(binary, name, path):
    text = help_text(binary, path)
    found = []
    subs = subcommands(text)
    rows = options(text)
    if rows and not (subs and name == "orderfleet" and not path):
        found.append((" ".join([name, *path]), text.splitlines()[0], rows))
    for sub in subs:
        found += walk(binary, name, [*path, sub])
    return found


def main():
    meta = subprocess.run(
        ["cargo", "metadata", "--no-deps", "--format-version", "1"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    target = pathlib.Path(json.loads(meta)["target_directory"]) / (sys.argv[1] if len(sys.argv) > 1 else "debug")
    parts = []
    for name in ("orderfleet-worker", "orderfleet", "orderfleet-bench", "orderfleet-bench-fleet"):
        for cmd, about, rows in walk(str(target / name), name, []):
            parts.append(f"#### `{cmd}`\n\n{about}\n\n{table(rows)}\n")
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    readme = readme[:start] + "\n\n" + "\n".join(parts) + "\n" + readme[end:]
    (ROOT / "README.md").write_text(readme)


if __name__ == "__main__":
    main()
