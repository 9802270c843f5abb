#!/usr/bin/env python3
"""Lists the functions of src/, cli/ and include/ longer than a limit.

A function is a definition that starts at column 0 (a free function or a
member defined outside its class) and ends at the first '}' at column 0
after it; its length counts its lines from the signature's first line to
that brace. In-class definitions are not counted (they are short here).

    scripts/long_functions.py              # over 80 lines, longest first
    scripts/long_functions.py --limit 60
    scripts/long_functions.py --rev 961ed31   # as of a commit
"""

import argparse
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = re.compile(r"^(?!namespace|struct|class|enum|union|template|#|//|using|extern|typedef|static_assert|\}|\s)"
                   r"[A-Za-z_].*\(")


def files(rev):
    if rev:
        out = subprocess.check_output(["git", "ls-tree", "-r", "--name-only", rev], cwd=ROOT,
                                      text=True).split()
    else:
        out = subprocess.check_output(["git", "ls-files", "--cached", "--others",
                                       "--exclude-standard"], cwd=ROOT, text=True).split()
    return [f for f in out if f.split("/")[0] in ("src", "cli", "include")
            and f.endswith((".cpp", ".h")) and not f.endswith("unicode_tables.cpp")]


def text(path, rev):
    if rev:
        return subprocess.check_output(["git", "show", "%s:%s" % (rev, path)], cwd=ROOT, text=True)
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def functions(path, source):
    lines = source.split("\n")
    i = 0
    while i < len(lines):
        if START.match(lines[i]) and not lines[i].rstrip().endswith(";"):
            # The signature runs to the line that opens the body.
            j = i
            while j < len(lines) and "{" not in lines[j] and not lines[j].rstrip().endswith(";"):
                j += 1
            if j < len(lines) and "{" in lines[j] and not lines[j].rstrip().endswith("};"):
                k = j
                if not (lines[j].rstrip().endswith("}") and lines[j].count("{") == lines[j].count("}")):
                    k = j + 1
                    while k < len(lines) and not lines[k].startswith("}"):
                        k += 1
                name = re.sub(r"\s+", " ", " ".join(lines[i:j + 1]))
                name = re.search(r"([A-Za-z_][A-Za-z_0-9:~<>]*)\s*\(", name)
                yield (name.group(1) if name else lines[i].strip()), i + 1, k - i + 1
                i = k
        i += 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=80)
    ap.add_argument("--rev", default="")
    args = ap.parse_args()
    found = []
    for path in files(args.rev):
        for name, line, length in functions(path, text(path, args.rev)):
            if length > args.limit:
                found.append((length, name, "%s:%d" % (path, line)))
    for length, name, where in sorted(found, reverse=True):
        print("%4d  %-40s %s" % (length, name, where))
    print("%d functions over %d lines" % (len(found), args.limit), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
