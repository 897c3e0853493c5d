"""Pieces every piflow script shares: user errors, dataclass-derived flags, safe files, the run lock, image grids.

    UserError, user_errors(prog)    a mistake in what the user asked for -> one line on stderr, exit 2 (main only)
    add_flags(parser, cls, ...)     argparse flags derived from a dataclass (help = the field's comment)
    from_settings(cls, settings)    a dataclass from a settings dict (a run's, a parsed command line's)
    check(args, rules, parser)      piflow.check_fields on flags: the message names --the-flag
    load_tensors(path, what)        torch.load(weights_only=True): a file that needs unpickling is refused
    hub_file(repo, filename, ...)   a hub file, the cache first; offline / missing: one line naming the id
    save_atomic(path, write)        write a temporary file in the same folder, fsync, then os.replace
    publish_dir(path, write)        write a folder as a new version, then switch the `path` symlink atomically
    RunLock(folder)                 an exclusive lock on an output folder (a second run is refused)
    check_writable(path, what)      fail before the work, not after it
    check_finite(tensors, what)     refuse NaN / inf weights; check_finite_output: images / arrays (UserError)
    check_memory(nbytes, flag, ..)  refuse a size flag beyond this machine's memory, before any work
    read_json(path, what)           json.load with one-line errors naming the file
    save_grid(rows, path, ...)      labelled PNG grid with Pillow
"""
import argparse
import contextlib
import dataclasses
import inspect
import math
import os
import re
import sys
import tempfile
import typing

import torch

import piflow


PROGRESS_DELAY = 2.0          # seconds after which a sampling loop shows its tqdm bar (quick runs stay silent)


class UserError(Exception):
    """A bad flag, missing file, offline hub, unwritable path, ...: main() prints it as one line and exits 2."""


def first_line(e, limit=200):
    """The first line of an exception's message (its type's name if empty), at most `limit` characters."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def is_out_of_memory(e):
    """A failed allocation: torch.OutOfMemoryError, or the CPU allocator's RuntimeError ('... can't allocate ...',
    'not enough memory ...')."""
    msg = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, (RuntimeError, MemoryError)) and (
        "allocate" in msg or "out of memory" in msg or "not enough memory" in msg or isinstance(e, MemoryError)))


@contextlib.contextmanager
def user_errors(prog, sized_by=None):
    """Turn UserError into one line on stderr and SystemExit(2); with `sized_by` (the flag(s) that size the big
    tensors, e.g. '--batch-size'), a failed allocation too. Everything else propagates (a real bug)."""
    try:
        yield
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":                                # once under torchrun
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except (RuntimeError, MemoryError) as e:
        if sized_by is None or not is_out_of_memory(e):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: error: out of memory ({type(e).__name__}: {first_line(e, 120)}); lower {sized_by}",
                  file=sys.stderr, flush=True)
        raise SystemExit(2) from None


#################################################################################
#                      Flags derived from dataclass fields                      #
#################################################################################

def field_comments(cls):
    """{field: its trailing '# comment'} read from the class source (the comment is the flag's help)."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def flag(name):
    return "--" + name.replace("_", "-")


def hyphenate(argv):
    """Accept the old underscore spellings of every flag: --batch_size=8 -> --batch-size=8 (values untouched)."""
    out = []
    for a in argv:
        if a.startswith("--") and len(a) > 2:
            name, eq, value = a.partition("=")
            a = name.replace("_", "-") + eq + value
        out.append(a)
    return out


def add_flags(parser, cls, defaults=None, skip=(), aliases=None):
    """One flag per field of dataclass `cls` (hyphenated; `aliases` {field: [old spellings]}), typed from the
    annotation, default from `defaults` or the field, help from the field's comment. Booleans get --x/--no-x;
    tuples take one value per element."""
    helps, defaults, aliases = field_comments(cls), defaults or {}, aliases or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = defaults.get(f.name, f.default)
        typ = hints[f.name]
        kw = dict(default=default, dest=f.name, help=f"{helps.get(f.name, '')} (default: %(default)s)")
        if typing.get_origin(typ) is typing.Union:                         # Optional[X]
            typ = next(t for t in typing.get_args(typ) if t is not type(None))
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(typ) is tuple:
            args = typing.get_args(typ)
            kw.update(type=args[0], nargs=len(args), metavar=tuple(f"V{i}" for i in range(len(args))))
        else:
            kw["type"] = typ
        parser.add_argument(flag(f.name), *aliases.get(f.name, ()), **kw)


def from_settings(cls, settings):
    """cls(**the entries of `settings` that are fields of dataclass cls), lists back to tuples (JSON-like settings
    of a checkpoint, an export's config, a command line's vars)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items() if k in names})


def _flag_message(e, names):
    """'name=value is not accepted; ...' (piflow.check_fields) -> '--name=value ...' when name is a flag."""
    msg = str(e)
    name = msg.split("=", 1)[0]
    return flag(name) + msg[len(name):] if name in names else msg


def build(cls, args, parser):
    """from_settings(cls, vars(args)); a ValueError from its validation becomes parser.error naming the flag."""
    try:
        return from_settings(cls, vars(args))
    except ValueError as e:
        parser.error(_flag_message(e, vars(args)))


def check(args, rules, parser=None):
    """piflow.check_fields(args, rules) on parsed flags: the first failing rule becomes parser.error('--field=value
    ...') (exit 2), or without a parser a UserError with that line."""
    try:
        piflow.check_fields(args, rules)
    except ValueError as e:
        if parser is not None:
            parser.error(_flag_message(e, {r[0] for r in rules}))
        raise UserError(_flag_message(e, {r[0] for r in rules})) from None


def parse_temperature(v):
    """--temperature: 'none', 'auto' (0.1 (NFE - 1), never on the last step) or a finite value > 0."""
    if v in ("none", "auto"):
        return None if v == "none" else "auto"
    try:
        T = float(v)
    except ValueError:
        T = math.nan
    if not (T > 0 and math.isfinite(T)):
        raise argparse.ArgumentTypeError(f"{v!r} is not accepted; expected 'none', 'auto' or a finite value > 0")
    return T


def parse_h(v):
    """--h: the flow-map SDE knob, a finite value >= 0 or 'inf' (piflow.check_h)."""
    try:
        return piflow.check_h(v if v == "inf" else float(v))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not accepted; expected a finite value >= 0 or 'inf'") from None


#################################################################################
#                                  Safe files                                   #
#################################################################################

def load_tensors(path, what):
    """torch.load(path, weights_only=True) with one-line errors: a file that needs unpickling (and so could run
    code) is refused; so is a missing or unreadable one."""
    if not os.path.isfile(path):
        raise UserError(f"{what}={path!r}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure is the user's file
        msg = str(e)                                 # a pickled object (GLOBAL) vs a corrupt or foreign file
        kind = "needs unpickling, which can run code; refused" if "GLOBAL" in msg or "Unsupported global" in msg \
            else f"is not a readable checkpoint ({type(e).__name__})"
        raise UserError(f"{what}={path!r} {kind}") from None


def hub_file(repo, filename, what, spec):
    """hf_hub_download, the cache first. HF_HUB_OFFLINE, an unreachable hub or a missing file: one UserError at
    once naming `what`={spec} (the host is resolved before any download, so huggingface_hub's retry loop never
    starts)."""
    import socket
    import urllib.parse
    import huggingface_hub
    from huggingface_hub import constants, errors
    where, host = f"{what}={spec!r} (not a local path; hub {repo}/{filename})", urllib.parse.urlparse(
        constants.ENDPOINT).hostname
    try:
        try:
            return huggingface_hub.hf_hub_download(repo, filename, local_files_only=True)
        except errors.LocalEntryNotFoundError:
            if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", ""):
                raise UserError(f"{where} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; download it "
                                "online first, or pass a local path") from None
        try:
            socket.getaddrinfo(host, 443)
        except OSError:
            raise UserError(f"{where} is not cached and {host} cannot be reached (offline?); connect, set "
                            "HF_ENDPOINT, or pass a local path") from None
        return huggingface_hub.hf_hub_download(repo, filename)
    except (errors.HfHubHTTPError, OSError, ValueError) as e:                # missing file / repo, bad id, ...
        raise UserError(f"{where}: {type(e).__name__}: {first_line(e)}") from None


def save_atomic(path, write):
    """write(tmp_path), fsync, then os.replace(tmp, path): readers see the old file or the new one, never a mix."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                                       # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_torch(obj, path):
    """torch.save through save_atomic, into a file object: torch names the zip records after a file *path* (here
    the random temporary one), so saving through a handle makes equal tensors give equal bytes."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    save_atomic(path, write)


def save_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    save_atomic(path, write)


def publish_dir(path, write):
    """Write a folder as a new version `path.<n>` with write(folder), then point the symlink `path` at it
    (os.replace of a symlink is atomic) and delete the previous version: `path` is always complete."""
    path = os.path.abspath(path)
    old = os.path.realpath(path) if os.path.islink(path) else None
    if os.path.exists(path) and not os.path.islink(path):
        raise UserError(f"{path!r} exists and is not a piflow export (a symlink to a version folder); move it away")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    new = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".v")
    write(new)
    link = new + ".link"
    os.symlink(os.path.basename(new), link)
    os.replace(link, path)
    if old and old != new and os.path.isdir(old):
        for name in os.listdir(old):
            os.remove(os.path.join(old, name))
        os.rmdir(old)


class RunLock:
    """Exclusive lock on an output folder (fcntl.flock on folder/.lock): a second run on it is refused.

    The lock dies with the process, so a crashed run never leaves a stale lock behind."""

    def __init__(self, folder):
        import fcntl
        os.makedirs(folder, exist_ok=True)
        self.file = open(os.path.join(folder, ".lock"), "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise UserError(f"--out={folder!r} is in use by another run (locked); wait for it or pick another "
                            "--out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()

    def release(self):
        if not self.file.closed:
            self.file.close()


def check_writable(path, what, is_dir=False):
    """Raise UserError unless `path` (a file, or a folder with is_dir) can be created and written."""
    folder = os.path.abspath(path if is_dir else os.path.dirname(os.path.abspath(path)))
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what}={path!r}: {probe!r} is not a writable folder")
    if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{what}={path!r}: folder {folder!r} is not writable")
    if not is_dir and os.path.isdir(path) and not os.path.islink(path):          # a link: a publish_dir export
        raise UserError(f"{what}={path!r} is a folder; expected a file path")
    try:                                 # os.access grants root everything: write a probe file (e.g. /proc, ro mounts)
        with tempfile.TemporaryFile(dir=folder if os.path.isdir(folder) else probe):
            pass
    except OSError as e:
        raise UserError(f"{what}={path!r}: cannot write there ({type(e).__name__}: {first_line(e, 120)})") from None


class NonFinite(ValueError):
    """Weights about to be written hold NaN or inf (check_finite)."""


def check_finite(tensors, what):
    """Raise NonFinite (a ValueError) naming the first tensor with a NaN or inf ({name: tensor})."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFinite(f"{what}: {name} holds non-finite values")


def check_finite_output(x, what, hint=""):
    """Refuse to write non-finite images / arrays (a tensor or numpy array): UserError naming `what`."""
    t = torch.as_tensor(x)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n = int((~torch.isfinite(t)).sum())
        raise UserError(f"{what}: {n} of {t.numel()} values are NaN or inf; nothing written" + (f" ({hint})" if hint
                                                                                                  else ""))


def check_memory(nbytes, flag, value, what):
    """Refuse, before any work, a size flag whose tensors alone exceed this machine's physical memory."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if nbytes > total:
        raise UserError(f"{flag}={value} is not accepted: {what} alone need {nbytes / 2 ** 30:.1f} GiB, more than "
                        f"this machine's {total / 2 ** 30:.1f} GiB; lower {flag}")


def read_json(path, what):
    """json.load(path) with one-line errors naming the file (malformed JSON, unreadable, not UTF-8)."""
    import json
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{what}: {path!r} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") \
            from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what}: {path!r} cannot be read ({type(e).__name__}: {first_line(e, 120)})") from None


#################################################################################
#                                 Image grids                                   #
#################################################################################

def save_grid(rows, path, row_labels=None, col_labels=None, title=None, pad=2):
    """Write a PNG grid of uint8 tiles (H, W) or (H, W, 3): rows[i][j] (None = blank), with optional labels
    left of each row, above each column and a title line. Written atomically."""
    from PIL import Image, ImageDraw, ImageFont
    tiles = [t for r in rows for t in r if t is not None]
    th, tw = tiles[0].shape[:2]
    font = ImageFont.load_default(size=12)       # Pillow's default font: at its size 10 a space is 2 px wide
    text_w = lambda s: int(font.getlength(s)) + 6
    lw = max([text_w(s) for s in row_labels or []] + [0])
    th_top = (16 if title else 0) + (16 if col_labels else 0)
    ncol = max(len(r) for r in rows)
    W, H = lw + ncol * (tw + pad) + pad, th_top + len(rows) * (th + pad) + pad
    W = max([W, text_w(title or "")] + [lw + pad + j * (tw + pad) + text_w(s) for j, s in enumerate(col_labels or [])
                                         if s])                          # no label or title is cut off
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    if title:
        d.text((pad, 1), title, fill=(0, 0, 0), font=font)
    for j, s in enumerate(col_labels or []):
        if s:
            d.text((lw + pad + j * (tw + pad), th_top - 15), s, fill=(0, 0, 0), font=font)
    for i, r in enumerate(rows):
        y = th_top + pad + i * (th + pad)
        if row_labels:
            d.text((2, y + th // 2 - 7), row_labels[i], fill=(0, 0, 0), font=font)
        for j, t in enumerate(r):
            if t is not None:
                img.paste(Image.fromarray(t).convert("RGB"), (lw + pad + j * (tw + pad), y))
    save_atomic(path, lambda tmp: img.save(tmp, format="PNG"))
    return img.size
