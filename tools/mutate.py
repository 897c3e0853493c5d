"""Mutation testing with mutmut: the core (piflow.py) and the edges (trainer, checkpoint / CLI helpers, the attachments'
own functions), each file against the tests that reach it. A developer command, not part of CI.

    pip install mutmut==3.8.1                     # developer tool only, not in requirements.txt
    python -m tools.mutate                        # the core: piflow.py, ~1900 mutants, ~12 min on 2 cores
    python -m tools.mutate --target trainer       # one row of TARGETS (trainer, common, toy, toy2d, sit, t2i)
    python -m tools.mutate --target all           # every row, one after the other
    python -m tools.mutate --target sit 'models.sit.xǁGMDiTǁforward__*'   # only some mutants (names or globs)

mutmut plants one small change at a time in the target file (an operator, a constant, a dropped argument, ...) and
runs the target's tests that reach the changed function; a mutant no test notices "survives". It all happens in a
private copy, runs/mutation/<target>/tree (the tracked files of the working tree), so mutants never touch the
checkout. Differences from a bare `mutmut run`:
  * mutmut skips decorated functions; `@torch.no_grad()` (top level or in a class) is rewritten in the copy as the
    equivalent `f = torch.no_grad()(f)` after the def, so those functions are mutated too;
  * each target runs only the tests that exercise it (TARGETS: file, tests, -k selection), and, where a file holds
    much more than the part under test (the attachments), only the mutants of the named functions (globs): heads,
    packing / unpacking, guidance, schedules. Hypothesis runs its usual examples without shrinking (profile
    "mutation" of test_piflow.py): a mutant only has to fail;
  * error-message wording is not mutated (lines raising UserError / ValueError / Diverged, printing, and string
    continuation lines); the checks are.
Output per target: runs/mutation/<target>/summary.txt (counts, score, wall and CPU time) and survivors.md (the diff
of every mutant not killed). `--tests FILE` replaces the core's test file (e.g. an older test_piflow.py, for a
before/after score). To look at one mutant: `cd runs/mutation/<target>/tree && mutmut show NAME`.
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

# target -> (file to mutate, pytest selection: the fast tests that reach it, mutant globs: the functions under test)
FAST_TRAINER = ("clipping or learning_rate or ema_decay or resume_continues or bad_steps or lr_1e6 or guard_counts "
                "or refuses or complete_checkpoint or non_finite_ema or failed_allocation or beyond_memory or bad_flags")
TARGETS = {
    "core": ("piflow.py", ["test_piflow.py", "-k", "not end_to_end"], None),
    "trainer": ("runtime/trainer.py", ["tests/test_trainer.py", "-k", "clipping or learning_rate or ema_decay or "
                                       "guard or bad_steps or lr_1e6 or non_finite_ema or cadence or count_in_a_row"],
                [f"runtime.trainer.{f}__*" for f in ("x_lr_at", "x_micro_seed", "xǁTrainingǁgradients",
                                                      "xǁTrainingǁis_bad", "xǁTrainingǁloop")]),
    "trainer-io": ("runtime/trainer.py", ["tests/test_trainer.py", "-k", FAST_TRAINER],
                   [f"runtime.trainer.{f}__*" for f in ("x_micro_loss", "x_read_checkpoint", "xǁTrainingǁsave")]),
    "common": ("runtime/common.py", ["tests/test_trainer.py", "tests/test_toy.py", "-k",
                                     FAST_TRAINER + " or bad_input or factory_errors or failed_allocation or "
                                     "equal_tensors or unwritable or pickle or common_flag or save_atomic_temp or "
                                     "read_json or check_writable_and"],
               [f"runtime.common.{f}__*" for f in (
                   "x_first_line", "x_is_out_of_memory", "x_user_errors", "x_hyphenate", "x_from_settings",
                   "x__flag_message", "x_check", "x_parse_temperature", "x_load_tensors", "x_save_atomic",
                   "x_check_writable", "x_check_finite", "x_check_finite_output", "x_check_memory", "x_read_json")]),
    "toy2d": ("labs/toy2d.py", ["tests/test_toy.py", "-k", "post_processing or layout_it_cannot or factory_errors or "
                                                          "policy_student_defaults"],
              ["labs.toy2d.xǁPolicyStudentǁ*", "labs.toy2d.x_load_factory__*", "labs.toy2d.x_import_function__*"]),
    "sit": ("models/sit.py", ["tests/test_sit.py", "-k", "teacher_and_gm_student_match or training_teacher_guidance "
                                                         "or students_start or logstd_head or native_sit"],
            ["models.sit.xǁDiTǁunpatchify__*", "models.sit.xǁDiTǁtrunk__*", "models.sit.xǁGMDiTǁforward__*",
             "models.sit.xǁDXDiTǁforward__*", "models.sit.x_as_teacher__*", "models.sit.x_student_from_teacher__*",
             "models.sit.xǁSiTAttachmentǁ__init____*"]),
    "t2i": ("models/t2i.py", ["tests/test_t2i.py", "-k", "released_adapter_formats or our_flux2_adapter or "
                                                         "distilled_guidance or sd3_cfg"],
            ["models.t2i.xǁT2IStudentǁunpack__*", "models.t2i.xǁT2IStudentǁforward__*", "models.t2i.x__flux2_call__*",
             "models.t2i.x__flux_call__*", "models.t2i.x_adapter_head__*"]),
}
CONFIG = """[mutmut]
source_paths = {source}
also_copy =
{also_copy}
pytest_add_cli_args_test_selection =
{tests}
do_not_mutate_patterns =
    ^\\s*_fail\\(
    raise (common\\.)?(UserError|ValueError|Diverged|NonFinite)\\(
    ^\\s*(print|run\\.say|self\\.run\\.say|say)\\(
    ^\\s+f?["']
pytest_add_cli_args =
    -p
    no:cacheprovider
"""


def undecorate(src):
    """`@torch.no_grad()\\ndef f(...): ...` -> `def f(...): ...\\nf = torch.no_grad()(f)` (same object, mutable), at
    the top level and in class bodies. Other decorators are left (mutmut skips those functions)."""
    lines = src.splitlines(keepends=True)
    fns = []
    for node in ast.walk(ast.parse(src)):
        body = node.body if isinstance(node, (ast.Module, ast.ClassDef)) else []
        fns += [(n, n.col_offset) for n in body if isinstance(n, ast.FunctionDef) and
                [ast.get_source_segment(src, d) for d in n.decorator_list] == ["torch.no_grad()"]]
    for fn, col in sorted(fns, key=lambda f: -f[0].lineno):
        lines.insert(fn.end_lineno, " " * col + f"{fn.name} = torch.no_grad()({fn.name})\n")
        del lines[fn.decorator_list[0].lineno - 1]
    return "".join(lines)


def run_target(name, args):
    source, tests, globs = TARGETS[name]
    if name == "core" and args.tests != "test_piflow.py":
        tests = [args.tests] + tests[1:]
    out = (ROOT / args.out / name).resolve()
    tree = out / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if f.startswith((".venv", "runs/")):
            continue
        (tree / f).parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / f).is_symlink():                          # e.g. assets/digits_teacher -> its version folder
            os.symlink(os.readlink(ROOT / f), tree / f)
        elif (ROOT / f).is_file():
            shutil.copy2(ROOT / f, tree / f)
    (tree / source).write_text(undecorate((ROOT / source).read_text()))
    also = sorted({f.split("/")[0] for f in files if (tree / f).exists()} - {source, "tests", "setup.cfg"})
    also = [a for a in also if not a.startswith(("test_", "."))]       # tests/ and test_*.py: mutmut copies them
    (tree / "setup.cfg").write_text(CONFIG.format(source=source, also_copy="\n".join(f"    {a}" for a in also),
                                                  tests="\n".join(f"    {t}" for t in tests)))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
               PIFLOW_HYPOTHESIS_PROFILE="mutation")   # test_piflow.py: no shrinking of failures
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    subprocess.run(["mutmut", "run", "--max-children", str(args.jobs), *(args.mutants or globs or [])], cwd=tree,
                   env=env, check=True)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime     # mutmut and its workers
    res = subprocess.run(["mutmut", "results", "--all", "true"], cwd=tree, env=env, check=True,
                         capture_output=True, text=True).stdout
    status = dict(re.findall(r"^\s+(\S+): (.+)$", res, re.M))
    wanted = args.mutants or globs
    if wanted:                                                     # only the mutants this run was about
        pats = [re.compile("^" + re.escape(g).replace(r"\*", ".*") + "$") for g in wanted]
        status = {k: v for k, v in status.items() if any(p.match(k) for p in pats)}
    counts = {s: sum(v == s for v in status.values()) for s in sorted(set(status.values()))}
    tested = len(status) - counts.get("no tests", 0) - counts.get("not checked", 0)
    detected = sum(counts.get(k, 0) for k in ("killed", "timeout", "segfault"))   # segfault: worker killed
    score = detected / max(tested, 1)
    summary = (f"mutmut 3.8.1 on {source}, tests: {' '.join(tests)}, {args.jobs} worker(s)\n"
               + (f"mutants of: {' '.join(wanted)}\n" if globs and not args.mutants else
                  f"{len(args.mutants)} named mutants\n" if args.mutants else "")
               + f"mutants {len(status)}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
               + f"\nscore (killed + timeout + segfault) / (all - no tests - not checked) = {detected} / {tested} = "
               f"{score:.1%}\nwall time {wall / 60:.1f} min, CPU time {cpu / 60:.1f} min (load average at the end "
               f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)\n")
    cwd = os.getcwd()
    os.chdir(tree)
    from mutmut.mutation.diff_apply import get_diff_for_mutant   # mutmut 3.8's own `mutmut show`, in one process
    report = [f"# Mutants of {source} not killed\n\n```\n{summary}```\n"]
    for mutant, s in sorted(status.items()):
        if s not in ("killed", "no tests", "not checked"):
            report.append(f"\n## {mutant} ({s})\n\n```diff\n{get_diff_for_mutant(mutant, path=source)}\n```\n")
    os.chdir(cwd)
    (out / "summary.txt").write_text(summary)
    (out / "survivors.md").write_text("".join(report))
    print(summary + f"survivors with diffs: {out / 'survivors.md'}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="core", choices=sorted(TARGETS) + ["all"], help="which file (default: core)")
    p.add_argument("--tests", default="test_piflow.py", help="the core's test file (default: %(default)s)")
    p.add_argument("--out", default="runs/mutation", help="work and result folder (gitignored)")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel mutant workers")
    p.add_argument("mutants", nargs="*", help="only these mutants (names or globs, e.g. 'piflow.x_sample__*')")
    args = p.parse_args()
    if shutil.which("mutmut") is None:
        sys.exit("mutate.py: mutmut is not installed; run `pip install mutmut==3.8.1`")
    for name in (sorted(TARGETS) if args.target == "all" else [args.target]):
        run_target(name, args)


if __name__ == "__main__":
    main()
