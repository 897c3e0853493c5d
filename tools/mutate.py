"""Mutation testing of the core algorithm (piflow.py) with mutmut: a developer command, not part of CI.

    pip install mutmut==3.8.1              # developer tool only, not in requirements.txt
    python -m tools.mutate                 # all 1865 mutants: ~12 min on 2 cores; runs/mutation/survivors.md
    python -m tools.mutate 'piflow.x_sample__*'  # only some (mutmut names or globs), e.g. after adding a test

mutmut plants one small change at a time in piflow.py (an operator, a constant, a dropped argument, ...) and
runs the core tests that reach the changed function; a mutant no test notices "survives". It all happens in a
private copy, runs/mutation/tree (piflow.py, piflow_kernels.py, conftest.py, test_piflow.py of the working tree),
so mutants never touch the checkout. Differences from a bare `mutmut run`:
  * mutmut skips decorated functions; `@torch.no_grad()` on the sampler, EMA and head initialisers is rewritten in
    the copy as the equivalent `f = torch.no_grad()(f)` after the def, so those functions are mutated too;
  * tests: test_piflow.py without the slow end-to-end training runs (`-k "not end_to_end"`); every kept test checks
    against an independent ground truth. Hypothesis runs its usual examples without shrinking a failure (profile
    "mutation" of test_piflow.py): a mutant only has to fail;
  * error-message wording (`_fail(...)` / `raise ValueError(...)` statements) is not mutated; the checks are.
Output: runs/mutation/summary.txt (counts, score, wall and CPU time) and runs/mutation/survivors.md (the diff of
every mutant not killed). `--tests FILE` runs another test file (e.g. an older test_piflow.py, for a before/after
score). To look at one mutant: `cd runs/mutation/tree && mutmut show NAME` (or `mutmut apply NAME` there).
"""
import argparse
import ast
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent                 # the repository
FILES = ["piflow.py", "piflow_kernels.py", "conftest.py"]
CONFIG = r"""[mutmut]
source_paths = piflow.py
also_copy =
    conftest.py
    piflow_kernels.py
pytest_add_cli_args_test_selection =
    test_piflow.py
    -k
    not end_to_end
do_not_mutate_patterns =
    ^\s*_fail\(
    raise ValueError\(
pytest_add_cli_args =
    -p
    no:cacheprovider
"""


def undecorate(src):
    """`@torch.no_grad()\\ndef f(...): ...` -> `def f(...): ...\\nf = torch.no_grad()(f)` (same object, mutable)."""
    lines = src.splitlines(keepends=True)
    fns = [n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.decorator_list]
    for fn in reversed(fns):
        decos = [ast.get_source_segment(src, d) for d in fn.decorator_list]
        if decos != ["torch.no_grad()"]:
            sys.exit(f"mutate.py: unexpected decorators {decos} on {fn.name}; extend undecorate()")
        lines.insert(fn.end_lineno, f"{fn.name} = torch.no_grad()({fn.name})\n")
        del lines[fn.decorator_list[0].lineno - 1]
    return "".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tests", default="test_piflow.py", help="the test file to run against the mutants")
    p.add_argument("--out", default="runs/mutation", help="work and result folder (gitignored)")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel mutant workers")
    p.add_argument("mutants", nargs="*", help="only these mutants (names or globs, e.g. 'piflow.x_sample__*')")
    args = p.parse_args()
    if shutil.which("mutmut") is None:
        sys.exit("mutate.py: mutmut is not installed; run `pip install mutmut==3.8.1`")
    out = (ROOT / args.out).resolve()
    tree = out / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    for f in FILES:
        shutil.copy(ROOT / f, tree / f)
    shutil.copy(ROOT / args.tests, tree / "test_piflow.py")
    (tree / "piflow.py").write_text(undecorate((ROOT / "piflow.py").read_text()))
    (tree / "setup.cfg").write_text(CONFIG)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
               PIFLOW_HYPOTHESIS_PROFILE="mutation")   # test_piflow.py: no shrinking of failures
    t0 = time.time()
    subprocess.run(["mutmut", "run", "--max-children", str(args.jobs), *args.mutants], cwd=tree, env=env, check=True)
    wall = time.time() - t0
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu.ru_utime + cpu.ru_stime                                 # mutmut and its workers, all cores
    res = subprocess.run(["mutmut", "results", "--all", "true"], cwd=tree, env=env, check=True,
                         capture_output=True, text=True).stdout
    status = dict(re.findall(r"^\s+(\S+): (.+)$", res, re.M))
    counts = {s: sum(v == s for v in status.values()) for s in sorted(set(status.values()))}
    tested = len(status) - counts.get("no tests", 0) - counts.get("not checked", 0)
    detected = sum(counts.get(k, 0) for k in ("killed", "timeout", "segfault"))   # segfault: worker killed
    score = detected / max(tested, 1)
    summary = (f"mutmut 3.8.1 on piflow.py, tests: {args.tests} -k 'not end_to_end', {args.jobs} workers\n"
               f"mutants {len(status)}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) +
               f"\nscore (killed + timeout + segfault) / (all - no tests - not checked) = {score:.1%}\n"
               f"wall time {wall / 60:.1f} min, CPU time {cpu / 60:.1f} min (load average at the end "
               f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)\n")
    os.chdir(tree)
    from mutmut.mutation.diff_apply import get_diff_for_mutant   # mutmut 3.8's own `mutmut show`, in one process
    report = [f"# Mutants of piflow.py not killed\n\n```\n{summary}```\n"]
    for name, s in sorted(status.items()):
        if s not in ("killed", "no tests", "not checked"):
            report.append(f"\n## {name} ({s})\n\n```diff\n{get_diff_for_mutant(name, path='piflow.py')}\n```\n")
    (out / "summary.txt").write_text(summary)
    (out / "survivors.md").write_text("".join(report))
    print(summary + f"survivors with diffs: {out / 'survivors.md'}")


if __name__ == "__main__":
    main()
