#!/usr/bin/env python3
"""tools/func_lengths.py — functions longer than a limit in the production C and
CUDA sources (common/ kvpool/ engine/ api/ daemon/ kernels/ tools/).

The charter's rule: no function over 150 lines outside data tables and lexers.
`make check-funcs` (part of `make test`) runs this and fails when a function
over the limit is not in ALLOWED below, or when an ALLOWED entry is no longer
over the limit (so the list only shrinks: remove the entry once it is split).

Length = lines from the line holding the function's name to its closing
brace, as `ctags -x --fields=+ne` counts them. The scanner is a small one of its
own (no ctags needed in CI): comments, string and character literals and
preprocessor lines are blanked, then a '{' at file level (or inside
extern "C" / namespace) that follows a ')' opens a function body.

Usage: tools/func_lengths.py [--limit N] [--list] [PATH...]
  --list   print every function over the limit (allowed or not), longest first
  PATH     files or folders (default: the production folders above)
"""
import argparse
import os
import re
import sys

DIRS = ["common", "kvpool", "engine", "api", "daemon", "kernels", "tools"]
EXTS = (".c", ".h", ".cu", ".cuh")

# name -> why it may stay over the limit. Keep each reason honest; remove an
# entry as soon as its function is split (a stale entry fails the check).
ALLOWED = {
    # api/jinja/lex.c: the Jinja lexer, one state machine over the template's
    # characters; splitting it would scatter the token rules across helpers.
    "jj_lex": "lexer",
    # api/jinja/eval.c: the filter dispatch table, a flat chain of
    # `IS("tojson") ... ` cases, one short case per Jinja filter (a data table
    # written as code).
    "filter_call": "dispatch table",
}


def blank(text):
    """Comments, literals and preprocessor lines replaced by spaces; newlines kept."""
    out = []
    i, n = 0, len(text)
    line_start = True
    while i < n:
        c = text[i]
        if line_start and c == "#" or (line_start and c in " \t" and text[i:].lstrip(" \t").startswith("#")):
            # a preprocessor line, with its backslash continuations
            j = i
            while j < n:
                if text[j] == "\n" and (j == 0 or text[j - 1] != "\\"):
                    break
                j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
            continue
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
            line_start = False
            continue
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            out.append(" " * (j - i))
            i = j
            line_start = False
            continue
        out.append(c)
        if c == "\n":
            line_start = True
        elif c not in " \t":
            line_start = False
        i += 1
    return "".join(out)


def functions(text):
    """Yields (name, first line, last line) of every function definition."""
    s = blank(text)
    line_of = [0] * (len(s) + 1)
    ln = 1
    for k, ch in enumerate(s):
        line_of[k] = ln
        if ch == "\n":
            ln += 1
    line_of[len(s)] = ln
    stack = []  # per open brace: ("transparent"|"func"|"other", name, start index)
    for k, ch in enumerate(s):
        if ch == "{":
            entry = ("other", None, 0)
            if all(b[0] == "transparent" for b in stack):
                j = k - 1
                while j >= 0 and s[j].isspace():
                    j -= 1
                head = s[max(0, j - 200):j + 1]
                if re.search(r"(\bextern|\bnamespace(\s+\w+)?)$", head):
                    entry = ("transparent", None, 0)
                elif j >= 0 and s[j] == ")":
                    found = name_before_params(s, j)
                    if found:
                        entry = ("func", found[0], found[1])
            stack.append(entry)
        elif ch == "}" and stack:
            kind, name, pos = stack.pop()
            if kind == "func":
                yield name, line_of[pos], line_of[k]


def name_before_params(s, close):
    """For the ')' at index close, the identifier before its '(' (and its index)."""
    depth = 0
    k = close
    while k >= 0:
        if s[k] == ")":
            depth += 1
        elif s[k] == "(":
            depth -= 1
            if depth == 0:
                break
        k -= 1
    if k < 0:
        return None
    m = re.search(r"([A-Za-z_]\w*)\s*$", s[:k])
    if not m or m.group(1) in ("if", "for", "while", "switch", "return", "sizeof"):
        return None
    before = s[:m.start()].rstrip()
    if before.endswith("="):  # an initializer, not a definition
        return None
    return (m.group(1), m.start())


def source_files(paths):
    for p in paths:
        if os.path.isfile(p):
            yield p
            continue
        for root, dirs, files in os.walk(p):
            dirs.sort()
            for f in sorted(files):
                if f.endswith(EXTS):
                    yield os.path.join(root, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=150)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("paths", nargs="*")
    a = ap.parse_args()
    paths = a.paths or [d for d in DIRS if os.path.isdir(d)]
    long_ones = []
    for path in source_files(paths):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for name, first, last in functions(text):
            n = last - first + 1
            if n > a.limit:
                long_ones.append((n, name, path, first))
    long_ones.sort(key=lambda t: (-t[0], t[2], t[3]))
    if a.list:
        for n, name, path, first in long_ones:
            note = f"  [allowed: {ALLOWED[name]}]" if name in ALLOWED else ""
            print(f"{n:5d} {name} {path}:{first}{note}")
        return 0
    bad = [t for t in long_ones if t[1] not in ALLOWED]
    for n, name, path, first in bad:
        print(f"{path}:{first}: {name} is {n} lines (limit {a.limit}): split it into named helpers")
    over = {t[1] for t in long_ones}
    stale = [] if a.paths else sorted(set(ALLOWED) - over)
    for name in stale:
        print(f"tools/func_lengths.py: ALLOWED lists {name}, which is no longer over {a.limit} lines: remove it")
    if bad or stale:
        return 1
    print(f"check-funcs: no function over {a.limit} lines outside the {len(ALLOWED)} allowed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
