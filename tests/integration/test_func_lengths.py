#!/usr/bin/env python3
"""tests/integration/test_func_lengths.py — tools/func_lengths.py (`make
check-funcs`) on small C files written here: a function of limit+1 lines fails
naming it, one of exactly the limit passes; braces in strings, comments and
preprocessor lines are not counted; functions inside extern "C" are found;
initializers and struct bodies are not functions; the real tree passes.

Usage: test_func_lengths.py [ignored]   (run from the repo root)
Prints one line per check and a closing "func_lengths: N passed, N failed" line.
"""
import os
import subprocess
import sys
import tempfile

results = {"passed": 0, "failed": 0}
TOOL = "tools/func_lengths.py"


def check(name, cond, detail=""):
    results["passed" if cond else "failed"] += 1
    print(f"{'ok  ' if cond else 'FAIL'} {name}" + ("" if cond else f" {detail}"))


def run(*args):
    return subprocess.run([sys.executable, TOOL] + list(args), capture_output=True, text=True, timeout=120)


def func(name, lines, body_line="    x++;"):
    """A function whose name line to closing brace spans exactly `lines` lines."""
    return f"static void {name}(void) {{\n" + (body_line + "\n") * (lines - 2) + "}\n"


def main():
    with tempfile.TemporaryDirectory() as d:
        def write(fname, text):
            p = os.path.join(d, fname)
            with open(p, "w") as f:
                f.write(text)
            return p

        p = write("long.c", "/* x */\n" + func("just_right", 150) + "\n" + func("too_long", 151))
        r = run(p)
        check("151 lines fails naming the function and its line",
              r.returncode == 1 and f"{p}:153: too_long is 151 lines (limit 150)" in r.stdout
              and "just_right" not in r.stdout, r.stdout + r.stderr)
        r = run("--limit", "151", p)
        check("--limit moves the bar", r.returncode == 0, r.stdout)

        tricky = ('#define OPEN {\n'
                  'static const char *s = "{{{";\n'
                  'static const int tab[] = {1, 2,\n 3};\n'
                  'struct big {\n' + "    int a;\n" * 200 + '};\n'
                  'extern "C" {\n' + func("inside_extern", 160, '    puts("}}"); /* { */ // {') + '}\n'
                  'int two(int a,\n        int b)\n{\n' + "    a++;\n" * 160 + '    return a + b;\n}\n')
        p = write("tricky.cu", tricky)
        r = run("--list", p)
        lines = r.stdout.strip().splitlines()
        names = [ln.split()[1] for ln in lines]
        check("extern \"C\" body, multi-line signature; strings, comments, macros and tables ignored",
              names == ["two", "inside_extern"] and lines[1].split()[0] == "160", r.stdout)
        check("a definition's length counts from the name's line", lines[0].split()[0] == "165", r.stdout)

    r = run()
    check("the tree passes make check-funcs", r.returncode == 0, r.stdout + r.stderr)
    print(f"func_lengths: {results['passed']} passed, {results['failed']} failed")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
