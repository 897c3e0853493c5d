"""Every command shown in README.md, assets/README.md and docs/*.md works as written, or is listed with its cost.

docs/commands.md catalogues each command once, with a kind:
    run       this test runs it as written (a subprocess; cwd = a fresh folder, the repository on PYTHONPATH, so its
              outputs do not land in the checkout) and requires exit 0
    offline   it needs the model hub, a data set or a GPU: called here in-process (its main(argv); torchrun as one
              process) from a fresh folder with HF_HUB_OFFLINE=1, it must stop before any heavy work with exit 2 and
              one line naming the argument
    heavy     minutes of CPU: not run here; the page gives its measured time
    install   a pip command (not run: it would change the environment)
    suite     the test suite itself
The catalogue and the pages must agree both ways: a command shown but not catalogued, or a catalogued command no
page shows, fails the test.
"""
import importlib
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "assets" / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
CATALOGUE = ROOT / "docs" / "commands.md"
KINDS = ("run", "offline", "heavy", "install", "suite")
COMMAND = re.compile(r"(python|torchrun|pip) ")


def shown_commands(page):
    """Commands of a page: lines of ```bash / plain fences and 4-space blocks (backslash continuations joined,
    trailing comments dropped), and inline `code` spans that start with python / torchrun / pip."""
    out, fence, buf = [], None, ""
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        if fence is None and not line.startswith("    "):
            out += [c for c in re.findall(r"`([^`]+)`", line) if COMMAND.match(c)]
            continue
        if fence not in (None, "bash", ""):
            continue
        cand = f"{buf} {line.strip()}" if buf else line.strip()
        if cand.endswith("\\"):
            buf = cand[:-1].strip()
            continue
        buf, cand = "", re.sub(r"\s+#.*$", "", cand)
        if COMMAND.match(cand):
            out.append(cand)
    return out


def catalogue():
    """{command: kind} from the table rows `| `command` | kind | ... |` of docs/commands.md."""
    rows = {}
    for line in CATALOGUE.read_text().splitlines():
        m = re.match(r"\|\s*`(.+)`\s*\|\s*(\w+)\s*\|", line)
        if m:
            assert m.group(2) in KINDS, f"docs/commands.md: unknown kind {m.group(2)!r} for {m.group(1)!r}"
            assert m.group(1) not in rows, f"docs/commands.md lists {m.group(1)!r} twice"
            rows[m.group(1)] = m.group(2)
    return rows


CMDS = catalogue()


def test_every_shown_command_is_catalogued_and_every_catalogued_one_is_shown():
    shown = {c: page.relative_to(ROOT) for page in PAGES if page != CATALOGUE for c in shown_commands(page)}
    missing = sorted(f"{c}  ({p})" for c, p in shown.items() if c not in CMDS)
    stale = sorted(c for c in CMDS if c not in shown)
    assert not missing, "commands shown but not in docs/commands.md:\n" + "\n".join(missing)
    assert not stale, "docs/commands.md lists commands no page shows:\n" + "\n".join(stale)


def argv_of(command):
    """The command as an argv run from any folder: scripts by their path in the checkout."""
    argv = shlex.split(command)
    if argv[0] == "torchrun":                                  # one process: drop torchrun and its own options
        argv = ["python"] + [a for a in argv[1:] if not a.startswith("--")][:1] + \
            argv[1 + next(i for i, a in enumerate(argv[1:]) if not a.startswith("--")) + 1:]
    assert argv[0] == "python", command
    if argv[1] != "-m":
        argv[1] = str(ROOT / argv[1])
    return [sys.executable] + argv[1:]


def run(command, tmp_path, **env):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    return subprocess.run(argv_of(command), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", [c for c, k in CMDS.items() if k == "run"])
def test_cheap_command_runs_as_written(command, tmp_path):
    r = run(command, tmp_path)
    assert r.returncode == 0, f"{command}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"


@pytest.mark.parametrize("command", [c for c, k in CMDS.items() if k == "offline"])
def test_command_that_needs_the_hub_or_data_stops_in_one_line_offline(command, tmp_path, monkeypatch, capsys):
    argv = argv_of(command)[1:]
    module, args = (argv[1], argv[2:]) if argv[0] == "-m" else (pathlib.Path(argv[0]).stem, argv[1:])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert e.value.code == 2 and len(errors) == 1, f"{command}: exit {e.value.code}\n{err[-3000:]}"
