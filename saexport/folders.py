"""Output folders that are never destroyed: claim, stage and swap, lock, and check before compute.

A wrong `--out` (the current folder, home, a build folder, the folder that holds the inputs) must be refused
before minutes of compute, a folder that is replaced must never be lost or half written, and two commands
writing one folder at once must not mix their outputs. Every command that writes goes through here.
Only the standard library and `saexport.errors`: this module sits at the bottom of the import order.

How a command uses it:

    # a folder written in place (build, export): claim it before compute, lock it while writing
    out = claim_output_folder(args.out, "build", inputs=[calib_embeddings])
    with FolderLock(out):
        clean_stale(out, ".export-")          # temp folders of killed exports
        with temporary_folder(out, ".export-") as tmp:
            ...                                # stage files in tmp, then rename them into out

    # a folder replaced whole (triton): check before compute, build beside it, swap it in
    out = check_replaceable_folder(args.out, "triton", inputs=[onnx_path])
    ... compute ...
    with staged_folder(out, "triton", inputs=[onnx_path]) as staging:
        write_repository(staging)

    # a file (generate --out video.gif): check before sampling, then write it with saexport.atomic; an existing
    # file is replaced only when `ours` recognises it as saexport's, or with overwrite
    path = check_writable_file_target(args.out, suffixes=(".gif", ".mp4"), ours=written_by_generate)

    # any write: an OSError (ENOSPC, EACCES, ENOTDIR, ...) becomes one line naming the file
    with plain_os_errors(path):
        ...
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from saexport.errors import SaexportError

MARKER = ".saexport-owner"
MARKER_VERSION = 1
LOCK_NAME = ".saexport.lock"
STALE_AFTER_S = 12 * 3600  # a staging folder of a live pid untouched this long: the pid was reused
_HOUSEKEEPING = re.compile(rf"{re.escape(LOCK_NAME)}|\..+\.saexport\.lock")  # they leave a folder empty
_MAX_RECORDED = 10_000  # a replaced folder's contents are recorded in its marker up to this many entries

Pathish = str | os.PathLike


@dataclass(frozen=True)
class Output:
    """Where a command writes (a file or a folder), and whether it may replace what saexport did not write there
    (or what was edited since it did)."""

    path: Path
    overwrite: bool = False


# ---------------------------------------------------------------------------------------------- messages


def _show(path: Pathish) -> str:
    """A path for a one-line message (newlines and other control characters escaped)."""
    text = os.fspath(path)
    return text if text.isprintable() else ascii(text)


def os_error_message(error: OSError, path: Pathish | None = None, action: str = "write") -> str:
    """One line: what could not be done to which file, why, and the fix."""
    where = _show(error.filename if error.filename is not None else path if path is not None else "?")
    code = error.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        why = "no space left on the device (or the quota is used up); free some space or write to another disk"
    elif code in (errno.EACCES, errno.EPERM):
        why = "permission denied; fix its permissions or write somewhere you may"
    elif code == errno.EROFS:
        why = "the filesystem is read-only; write somewhere else"
    elif code == errno.ENOTDIR:
        blocker = _first_non_folder(Path(where)) if where != "?" else None
        why = (f"{_show(blocker)} is a file, not a folder; use a path outside it" if blocker
               else "a part of the path is a file, not a folder; use another path")
    elif code == errno.ENOENT:
        why = "no such file or folder"
    elif code == errno.EISDIR:
        why = "it is a folder, not a file"
    elif code in (errno.EEXIST, errno.ENOTEMPTY):
        why = "something else is already there; move it away or use another path"
    else:
        why = error.strerror or str(error)
    return f"cannot {action} {where}: {why}"


@contextlib.contextmanager
def plain_os_errors(path: Pathish | None = None, action: str = "write") -> Iterator[None]:
    """Turn an OSError raised in the block into a one-line SaexportError (the CLI prints it, no traceback)."""
    try:
        yield
    except OSError as e:
        raise SaexportError(os_error_message(e, path, action)) from None


# ---------------------------------------------------------------------------------------------- path facts


def _resolve(path: Pathish) -> Path:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise SaexportError(f"cannot use {_show(path)}: {e}") from None


def _nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (a file stops the walk: lstat below it fails with ENOTDIR)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or "/")


def _first_non_folder(path: Path) -> Path | None:
    existing = _nearest_existing(path)
    return existing if existing != path and not existing.is_dir() else None


def _cwd() -> Path | None:
    try:
        return Path(os.getcwd()).resolve()
    except OSError:  # the current folder was deleted
        return None


def _home() -> Path | None:
    home = os.path.expanduser("~")
    return None if home == "~" else Path(home).resolve()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _protected_reason(target: Path) -> str | None:
    if target == Path(target.anchor):
        return "the filesystem root"
    cwd, home = _cwd(), _home()
    if cwd is not None and target == cwd:
        return "the current folder"
    if cwd is not None and cwd.is_relative_to(target):
        return f"it holds the current folder {_show(cwd)}"
    if home is not None and target == home:
        return "your home folder"
    if home is not None and home.is_relative_to(target):
        return f"it holds your home folder {_show(home)}"
    return None


# ---------------------------------------------------------------------------------------------- marker


def read_owner(folder: Pathish) -> str | None:
    """The command that marked `folder` as its own, or None without a marker. An unreadable marker is an error."""
    folder = Path(folder)
    marker = _read_marker(folder)
    return None if marker is None else marker["owner"]


def _read_marker(folder: Path) -> dict | None:
    path = folder / MARKER
    fix = f"delete {_show(path)} if the folder is saexport's, or use another folder"
    text = ""
    for _ in range(20):  # a marker being created (O_EXCL, then written) is empty for a moment
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise SaexportError(f"cannot read the marker {_show(path)} ({e}): {fix}") from None
        if text:
            break
        time.sleep(0.025)
    try:
        marker = json.loads(text)
        ok = isinstance(marker, dict) and isinstance(marker.get("owner"), str) and isinstance(marker["version"], int)
    except (json.JSONDecodeError, KeyError):
        ok = False
    if not ok:
        raise SaexportError(f"the marker {_show(path)} is not saexport's (want JSON owner and version): {fix}")
    if marker["version"] > MARKER_VERSION:
        raise SaexportError(f"{_show(folder)} was written by a newer saexport (marker version {marker['version']}): "
                            "upgrade saexport or use another folder")
    return marker


def _write_marker(folder: Path, owner: str, contents: list[str] | None = None, *, overwrite: bool = False,
                  option: str = "`out`") -> None:
    """Create the marker if absent (O_EXCL, so two commands racing for a new folder cannot both win), or
    overwrite it (in a staging folder, which only we see)."""
    record: dict = {"owner": owner, "version": MARKER_VERSION}
    if contents is not None:
        record["contents"] = contents
        record["fingerprints"] = _fingerprints(folder, contents)
    data = (json.dumps(record, indent=1) + "\n").encode()
    path = folder / MARKER
    with plain_os_errors(path):
        if overwrite:
            tmp = folder / f"{MARKER}.{os.getpid()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            marker = _read_marker(folder)
            if marker is not None and marker["owner"] != owner:
                raise SaexportError(_other_owner(folder, marker["owner"], owner, option)) from None
            return
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def _other_owner(folder: Path, found: str, owner: str, option: str) -> str:
    return (f"refusing to write into {_show(folder)}: it is a `saexport {found}` folder, not a `saexport {owner}` "
            f"one: pass {option} another folder")


# ---------------------------------------------------------------------------------------------- output folders


def check_output_folder(target: Pathish, owner: str, inputs: Iterable[Pathish] = (), *, option: str = "`out`",
                        adopt: Callable[[Path], bool] | None = None) -> Path:
    """Refuse, before any compute, a folder `owner` may not write; write nothing. Returns the resolved path.

    Allowed: a new folder (its parent creatable and writable), an empty one, or one whose marker names `owner`
    (or, without a marker, one that `adopt` accepts, e.g. a build folder of an older saexport holding build.json).
    Refused: `/`, the current folder or an ancestor of it, home or an ancestor of it, a folder that is or holds
    one of `inputs`, foreign files, another owner's marker, a file, a path under a file, no write permission.
    """
    path = _resolve(target)
    fix = f"pass {option} a new or empty folder"
    reason = _protected_reason(path)
    if reason is not None:
        raise SaexportError(f"refusing to write into {_show(path)} ({reason}): {fix}")
    for item in inputs:
        source = _resolve(item)
        if source == path or source.is_relative_to(path):
            raise SaexportError(f"refusing to write into {_show(path)}: it holds the input {_show(source)}; "
                                f"pass {option} a folder that holds no input")
    existing = _nearest_existing(path)
    if existing == path:
        if not path.is_dir():
            kind = "a file" if path.is_file() else "not a folder"
            raise SaexportError(f"{_show(path)} is {kind}: pass {option} a folder path")
        _check_contents(path, owner, option, adopt)
        if not os.access(path, os.W_OK | os.X_OK):
            raise SaexportError(f"cannot write into {_show(path)}: permission denied (or a read-only filesystem); "
                                f"pass {option} a folder you can write to")
    else:
        _check_ancestor_writable(path, existing, "create", f"pass {option} a path outside it",
                                 f"pass {option} a folder you can write to")
    return path


def _check_ancestor_writable(target: Path, existing: Path, verb: str, outside: str, writable: str) -> None:
    """`target` does not exist yet: its nearest existing ancestor must be a folder we may write into."""
    if not existing.is_dir():
        raise SaexportError(f"cannot {verb} {_show(target)}: {_show(existing)} is a file, not a folder; {outside}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SaexportError(f"cannot {verb} {_show(target)}: {_show(existing)} is not writable (permission denied "
                            f"or a read-only filesystem); {writable}")


def _check_contents(folder: Path, owner: str, option: str, adopt: Callable[[Path], bool] | None) -> None:
    with plain_os_errors(folder, "read"):
        names = sorted(name for name in os.listdir(folder) if not _HOUSEKEEPING.fullmatch(name))
    if not names:
        return
    if MARKER in names:
        marker = _read_marker(folder)
        if marker is not None and marker["owner"] != owner:
            raise SaexportError(_other_owner(folder, marker["owner"], owner, option))
        return
    if adopt is not None and adopt(folder):
        return
    raise SaexportError(f"refusing to write into {_show(folder)}: it holds files saexport did not mark as its own "
                        f"(e.g. {_show(names[0])}; no {MARKER}): pass {option} a new or empty folder")


def claim_output_folder(target: Pathish, owner: str, inputs: Iterable[Pathish] = (), *, option: str = "`out`",
                        adopt: Callable[[Path], bool] | None = None) -> Path:
    """`check_output_folder`, then create the folder (mode 0o777 & ~umask) and mark it as `owner`'s.

    For folders written in place; hold `FolderLock(folder)` while writing. Returns the resolved path.
    """
    path = check_output_folder(target, owner, inputs, option=option, adopt=adopt)
    with plain_os_errors(path, "create"):
        path.mkdir(mode=0o777, parents=True, exist_ok=True)  # the kernel applies the umask, to parents too
    _write_marker(path, owner, option=option)
    return path


# ---------------------------------------------------------------------------------------------- staging


def _host_tag() -> str:
    """Hostname hash in staging names: a pid means something only on the host that wrote it (shared disks)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _tagged(prefix: str) -> str:
    return f"{prefix}{os.getpid()}-{_host_tag()}-{secrets.token_hex(4)}"


def _tag_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(re.escape(prefix) + r"(\d+)-([0-9a-f]{8})-([0-9a-f]{8})")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a zombie counts; another user's counts)."""
    if pid <= 0:  # os.kill(0, ...) would signal our whole process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def _last_activity(path: Path) -> float:
    """Newest modification time in a tree: a file being written keeps a long export's staging folder fresh."""
    try:
        newest = path.lstat().st_mtime
    except OSError:
        return 0.0
    if path.is_dir() and not path.is_symlink():
        seen = 0
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
                seen += 1
                if seen > _MAX_RECORDED:
                    return newest
    return newest


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def clean_stale(folder: Pathish, prefix: str, *, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete the entries of `folder` named `prefix…` that no live run owns; returns what was deleted.

    A name made by `temporary_folder` (`prefix<pid>-<host>-<random>`) is stale when its pid is dead on this
    host, or when nothing in it changed for `max_age_s` (the pid was reused, or it is another host's);
    any other name with the prefix (e.g. tempfile's `.export-k2j9x_a1`) only by age. `prefix` must start
    with "." (only hidden entries, never a user's files); a symlink is removed, never followed.
    """
    if not prefix.startswith(".") or len(prefix) < 2 or "/" in prefix:
        raise ValueError(f"clean_stale needs a hidden-name prefix like '.export-', got {prefix!r}")
    folder = Path(folder)
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    pattern, host, now = _tag_pattern(prefix), _host_tag(), time.time()
    removed = []
    for name in sorted(names):
        if not name.startswith(prefix):
            continue
        entry = folder / name
        match = pattern.fullmatch(name)
        if match and match[2] == host:
            pid = int(match[1])
            if pid == os.getpid():
                continue
            stale = not pid_alive(pid) or now - _last_activity(entry) > max_age_s
        else:
            stale = now - _last_activity(entry) > max_age_s
        if stale:
            _remove(entry)
            removed.append(entry)
    return removed


def _new_hidden_folder(parent: Path, prefix: str) -> Path:
    with plain_os_errors(parent, "create a folder in"):
        while True:
            path = parent / _tagged(prefix)
            try:
                path.mkdir(mode=0o777)  # mkdtemp would make 0700
                return path
            except FileExistsError:
                continue


@contextlib.contextmanager
def temporary_folder(parent: Pathish, prefix: str) -> Iterator[Path]:
    """A hidden folder `prefix<pid>-<host>-<random>` in `parent`, deleted on exit; `clean_stale(parent, prefix)`
    deletes it after a SIGKILL (tempfile's names carry no pid, so only their age could tell)."""
    if not prefix.startswith("."):
        raise ValueError(f"temporary_folder needs a hidden-name prefix like '.export-', got {prefix!r}")
    path = _new_hidden_folder(Path(parent), prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _tree(folder: Path) -> list[str] | None:
    """Every path under `folder`, relative, sorted; None past _MAX_RECORDED entries."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            found.append(Path(root, name).relative_to(folder).as_posix())
            if len(found) > _MAX_RECORDED:
                return None
    return sorted(found)


def _fsync_folder(folder: Path) -> None:
    """Make renames in `folder` durable (best effort: some filesystems refuse fsync on folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _recover(target: Path) -> None:
    """Under the target's lock, every `.name.staging-*` / `.name.old-*` beside it is a killed run's. If the
    kill fell between the two renames of a swap, the target is missing and its old content is put back."""
    parent, name = target.parent, target.name
    staging, old = _tag_pattern(f".{name}.staging-"), _tag_pattern(f".{name}.old-")
    with plain_os_errors(parent, "read"):
        names = os.listdir(parent)
    olds = [parent / n for n in names if old.fullmatch(n)]
    if olds and not os.path.lexists(target):
        newest = max(olds, key=lambda p: p.lstat().st_mtime)
        with plain_os_errors(target, "restore"):
            os.rename(newest, target)
        olds.remove(newest)
    for entry in olds + [parent / n for n in names if staging.fullmatch(n)]:
        _remove(entry)


def _swap(staging: Path, target: Path) -> None:
    """Rename the old folder aside, the staging folder in, then delete the old one: at no moment is the old
    content gone before the new one is in place; if the second rename fails, the old one is put back."""
    with plain_os_errors(target, "replace"):
        if not os.path.lexists(target):
            os.rename(staging, target)
        else:
            old = target.parent / _tagged(f".{target.name}.old-")
            os.rename(target, old)
            try:
                os.rename(staging, target)
            except BaseException:
                os.rename(old, target)
                raise
            _fsync_folder(target.parent)
            shutil.rmtree(old, ignore_errors=True)  # a leftover is deleted by the next replacement
        _fsync_folder(target.parent)


def _fingerprint(file: Path) -> str:
    """What a file held when saexport wrote it: its SHA-256, or past 64 MiB (a copied graph or engine, never
    edited by hand) its size and modification time."""
    stat = file.stat()
    if stat.st_size > 64 << 20:
        return f"size:{stat.st_size}:mtime:{stat.st_mtime_ns}"
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fingerprints(folder: Path, tree: list[str] | None) -> dict[str, str] | None:
    if tree is None:
        return None
    return {name: _fingerprint(folder / name) for name in tree
            if name != MARKER and (folder / name).is_file() and not (folder / name).is_symlink()}


def _refuse_foreign_or_edited(target: Path, option: str, overwrite: bool) -> None:
    """A replaced folder's marker lists what saexport wrote, with each file's fingerprint. Anything else in it is a
    user's: keep it. A file of saexport's changed since (a hand edit of a config) is kept too, unless the caller
    was told to overwrite it."""
    if not target.is_dir():
        return
    marker = _read_marker(target)
    if marker is None or not isinstance(marker.get("contents"), list):
        return
    present = _tree(target)
    if present is None:
        return
    recorded = set(marker["contents"]) | {MARKER}
    extra = [p for p in present if p not in recorded and not _HOUSEKEEPING.fullmatch(p.rsplit("/", 1)[-1])]
    if extra:
        raise SaexportError(f"refusing to replace {_show(target)}: it holds {_show(extra[0])}, which saexport did "
                            f"not write; move it out, or pass {option} another folder")
    written = marker.get("fingerprints")
    if overwrite or not isinstance(written, dict):
        return
    edited = [name for name, fingerprint in written.items()
              if (target / name).is_file() and _fingerprint(target / name) != fingerprint]
    if edited:
        raise SaexportError(f"refusing to replace {_show(target)}: {_show(edited[0])} was changed since saexport "
                            "wrote it (a hand edit would be lost); copy your change elsewhere, or pass `overwrite` "
                            "to replace it")


def check_replaceable_folder(target: Pathish, owner: str, inputs: Iterable[Pathish] = (), *, option: str = "`out`",
                             overwrite: bool = False) -> Path:
    """Before any compute: `staged_folder(target, ...)` would accept `target` (as far as can be told without its
    lock). Writes nothing; returns the resolved path."""
    path = check_output_folder(target, owner, inputs, option=option)
    _refuse_foreign_or_edited(path, option, overwrite)
    return path


@contextlib.contextmanager
def staged_folder(target: Pathish, owner: str, inputs: Iterable[Pathish] = (), *, option: str = "`out`",
                  overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; when the block succeeds, swap it in for `target`.

    `target` must pass `check_output_folder` (new, empty, or marked as `owner`'s) and hold nothing that
    saexport did not write there, nor a file of saexport's edited since (unless `overwrite`). While the block
    runs, a lock beside the target (`.name.saexport.lock`) keeps out another saexport. Stale staging folders of
    killed runs are deleted first. If the block raises (or Ctrl-C), the staging folder is deleted and `target` is
    untouched.
    """
    inputs = list(inputs)
    path = check_output_folder(target, owner, inputs, option=option)
    with plain_os_errors(path.parent, "create"):
        path.parent.mkdir(mode=0o777, parents=True, exist_ok=True)
    with FolderLock(path, beside=True):
        _recover(path)
        path = check_output_folder(path, owner, inputs, option=option)  # it may have changed while we waited
        _refuse_foreign_or_edited(path, option, overwrite)
        staging = _new_hidden_folder(path.parent, f".{path.name}.staging-")
        try:
            _write_marker(staging, owner)
            yield staging
            _write_marker(staging, owner, _tree(staging), overwrite=True)
            _swap(staging, path)
        finally:
            if os.path.lexists(staging):
                shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- lock


def _current_command() -> str:
    argv = list(sys.argv) or ["?"]
    argv[0] = os.path.basename(argv[0]) or argv[0]
    return shlex.join(argv)


_HELD: dict[tuple[int, str], list[int]] = {}  # (pid, lock path) -> [fd, depth]: a process may nest its locks
_HELD_GUARD = threading.Lock()


class FolderLock:
    """An advisory lock (flock) on a folder, so two saexport commands never write it at once.

    The lock file is `folder/.saexport.lock`, or with `beside=True` `.name.saexport.lock` next to the folder
    (for a folder that is replaced whole: a lock inside would be replaced with it). It holds the holder's pid
    and command, for the message of the one who waits. `timeout`: 0 refuses at once, N seconds waits that long
    (saying who holds it), None waits for ever. The kernel drops the lock when the holder dies, even by SIGKILL;
    the file is deleted on release. Re-entrant within one process.
    """

    def __init__(self, folder: Pathish, *, beside: bool = False, timeout: float | None = 0.0,
                 command: str | None = None, option: str = "`out`", echo: Callable[[str], None] | None = None,
                 poll_s: float = 0.1) -> None:
        folder = _resolve(folder)
        self.folder = folder
        self.path = folder.parent / f".{folder.name}.saexport.lock" if beside else folder / LOCK_NAME
        self.timeout = timeout
        self.command = command
        self.option = option
        self.echo = echo if echo is not None else (lambda line: print(line, file=sys.stderr, flush=True))
        self.poll_s = poll_s
        self._key: tuple[int, str] | None = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        if self._key is not None:
            raise RuntimeError(f"{self.path} is already held by this FolderLock")
        key = (os.getpid(), str(self.path))
        with _HELD_GUARD:
            if key in _HELD:
                _HELD[key][1] += 1
                self._key = key
                return
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        announced = False
        while True:
            with plain_os_errors(self.path, "lock"):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if deadline is not None and time.monotonic() >= deadline:
                    still = f" still ({self.timeout:g} s later)" if self.timeout else ""
                    raise SaexportError(f"another saexport ({self._holder()}) is{still} writing "
                                        f"{_show(self.folder)}; wait for it or use another {self.option}") from None
                if not announced:
                    limit = "" if deadline is None else f" (up to {self.timeout:g} s)"
                    self.echo(f"waiting for another saexport ({self._holder()}) writing {_show(self.folder)}{limit}")
                    announced = True
                time.sleep(self.poll_s)
                continue
            # The previous holder deletes the file on release: if ours was deleted meanwhile, lock the new one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            try:
                info = {"pid": os.getpid(), "host": socket.gethostname(),
                        "command": self.command or _current_command(), "since": time.time()}
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            except OSError as e:
                self._unlock(fd)
                raise SaexportError(os_error_message(e, self.path, "lock")) from None
            with _HELD_GUARD:
                _HELD[key] = [fd, 1]
            self._key = key
            return

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None or key[0] != os.getpid():  # a forked child shares the parent's lock: leave it to the parent
            return
        with _HELD_GUARD:
            entry = _HELD[key]
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _HELD[key]
        self._unlock(entry[0])

    def _unlock(self, fd: int) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still locked: whoever waits on this file sees it gone and retries
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @property
    def held(self) -> bool:
        return self._key is not None

    def _holder(self) -> str:
        """'pid N, `command`' from the lock file (it may be empty for a moment after the holder got the lock)."""
        for _ in range(10):
            try:
                info = json.loads(self.path.read_text())
                break
            except (OSError, ValueError):
                time.sleep(0.02)
        else:
            return "pid unknown"
        if not isinstance(info, dict):
            return "pid unknown"
        where = f" on {info['host']}" if info.get("host") not in (None, socket.gethostname()) else ""
        command = f", `{info['command']}`" if info.get("command") else ""
        return f"pid {info.get('pid', 'unknown')}{where}{command}"


# ---------------------------------------------------------------------------------------------- files


def check_writable_file_target(path: Pathish, suffixes: Iterable[str] | None = None, *,
                               inputs: Iterable[Pathish] = (), option: str = "`out`", overwrite: bool = False,
                               ours: Callable[[Path], bool] | None = None) -> Path:
    """Refuse, before any compute, a file path that cannot be written; create nothing. Returns the resolved path.

    The suffix must be one of `suffixes` (case-insensitive); the path must not be a folder, a device or
    another non-regular file, one of `inputs` or inside an input folder (a checkpoint); its nearest existing
    ancestor must be a writable folder. An existing file is replaced only when `ours(file)` recognises it as one
    saexport wrote, or with `overwrite`: a user's file is never lost to a mistyped path.
    """
    target = _resolve(path)
    if suffixes is not None:
        allowed = [s.lower() for s in suffixes]
        if target.suffix.lower() not in allowed:
            raise SaexportError(f"{option} {_show(path)}: unknown file type '{target.suffix or '(none)'}'; "
                                f"use one of {', '.join(allowed)}")
    if target.is_dir():
        raise SaexportError(f"{option} {_show(target)} is a folder: pass a file path in it")
    if os.path.lexists(target) and not target.is_file():
        raise SaexportError(f"{option} {_show(target)} is not a regular file (a device?): pass another path")
    for item in inputs:
        source = _resolve(item)
        if source == target:
            raise SaexportError(f"{option} {_show(target)} is an input of this command: pass another path")
        if source.is_dir() and target.is_relative_to(source):
            raise SaexportError(f"{option} {_show(target)} lies inside the input {_show(source)}: pass a path "
                                "outside it")
    if target.is_file() and not overwrite and not (ours is not None and ours(target)):
        raise SaexportError(f"{option} {_show(target)} already exists and saexport did not write it: pass "
                            "`overwrite` to replace it, or another path")
    _check_ancestor_writable(target, _nearest_existing(target.parent), "write", f"pass {option} a path outside it",
                             f"pass {option} somewhere you can write")
    return target
