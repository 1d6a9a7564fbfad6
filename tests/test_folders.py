"""saexport.folders on real files: refused folders stay byte-for-byte, replacements never lose the old folder,
killed runs' leftovers are cleaned, locks contend across real processes."""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from saexport import folders
from saexport.errors import SaexportError
from saexport.folders import (
    LOCK_NAME,
    MARKER,
    FolderLock,
    check_output_folder,
    check_writable_file_target,
    claim_output_folder,
    clean_stale,
    pid_alive,
    plain_os_errors,
    read_owner,
    staged_folder,
    temporary_folder,
)

REPO = Path(__file__).resolve().parents[1]


def replace_folder_atomically(target, build, owner, inputs=(), **options) -> Path:
    """`build(staging)` writes the new content, then it replaces `target`: how the Triton writer uses the stage."""
    with staged_folder(target, owner, inputs, **options) as staging:
        build(staging)
    return Path(target).resolve()


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def snapshot(root: Path) -> dict:
    """Every entry under root (root included): mode, bytes, mtime: equal snapshots mean nothing was touched."""
    found = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.lstat()
        found[p.relative_to(root).as_posix()] = (st.st_mode, p.read_bytes() if p.is_file() else None, st.st_mtime_ns)
    return found


def build_like(folder: Path, marker_owner: str | None = None) -> Path:
    """A folder as `saexport build` leaves it, plus a user's notes."""
    (folder / "triton" / "wan_dit" / "1").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(os.urandom(4096))
    (folder / "topology.safetensors").write_bytes(os.urandom(1024))
    (folder / "build.json").write_text('{"stages": {}}\n')
    (folder / "triton" / "wan_dit" / "1" / "model.onnx").write_bytes(os.urandom(512))
    (folder / "notes.txt").write_text("my experiment, do not lose\n")
    if marker_owner is not None:
        (folder / MARKER).write_text(f'{{"owner": "{marker_owner}", "version": 1}}\n')
    return folder


def mark(folder: Path, owner: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(f'{{"owner": "{owner}", "version": 1}}\n')
    return folder


def refused(call, *args, **kwargs) -> str:
    """The SaexportError message of the call; it must be one line."""
    with pytest.raises(SaexportError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message, message
    return message


def python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def readline(stream, timeout: float = 20.0) -> str:
    """A line from a child's pipe, or fail (never hang the test run)."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no line from the child in {timeout} s"
    return stream.readline()


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    pid = int(done.stdout)
    assert not pid_alive(pid)
    return pid


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=20)


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("owner", ["triton", "build"])
def test_unmarked_build_folder_with_user_files_is_refused_and_untouched(tmp_path, owner):
    out = build_like(tmp_path / "out")
    before, around = snapshot(tmp_path), siblings(out)
    message = refused(claim_output_folder, out, owner)
    assert str(out) in message and "`out`" in message and MARKER in message
    called = []
    message = refused(replace_folder_atomically, out, called.append, owner)
    assert str(out) in message
    assert called == []  # refused before any compute
    refused(staged_folder(out, owner).__enter__)
    assert snapshot(tmp_path) == before and siblings(out) == around


def test_triton_into_a_marked_build_folder_is_refused_and_untouched(tmp_path):
    out = build_like(tmp_path / "out", marker_owner="build")
    before = snapshot(tmp_path)
    message = refused(replace_folder_atomically, out, lambda staging: None, "triton",
                      inputs=[out / "model.onnx"])
    assert str(out) in message
    message = refused(replace_folder_atomically, out, lambda staging: None, "triton")  # the marker alone refuses
    assert "saexport build" in message and "saexport triton" in message
    assert snapshot(tmp_path) == before


def test_current_folder_is_refused_even_when_empty_or_ours(tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    message = refused(claim_output_folder, ".", "triton")
    assert "(the current folder)" in message and str(here) in message
    mark(here, "triton")
    before = snapshot(here)
    refused(claim_output_folder, ".", "triton")
    refused(replace_folder_atomically, ".", lambda staging: None, "triton")
    refused(replace_folder_atomically, here, lambda staging: None, "triton")
    assert snapshot(here) == before
    claim_output_folder("sub", "triton")  # a new folder in the current one is fine
    assert read_owner(here / "sub") == "triton"


def test_root_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "filesystem root" in refused(check_output_folder, "/", "triton")
    assert "filesystem root" in refused(claim_output_folder, "/", "build")


def test_home_and_its_ancestors_are_refused_even_when_marked(tmp_path, monkeypatch):
    home = mark(tmp_path / "users" / "me", "build")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert "(your home folder)" in refused(claim_output_folder, home, "build")
    mark(tmp_path / "users", "build")
    assert "home folder" in refused(claim_output_folder, tmp_path / "users", "build")
    assert "home folder" in refused(claim_output_folder, tmp_path / "users" / ".." / "users" / "me", "build")
    claim_output_folder(home / "out", "build")  # below home is fine


def test_ancestor_of_the_current_folder_is_refused_even_when_marked(tmp_path, monkeypatch):
    parent = mark(tmp_path / "a", "triton")
    (parent / "b" / "c").mkdir(parents=True)
    monkeypatch.chdir(parent / "b" / "c")
    before = snapshot(parent)
    for target in (parent, "../..", Path("..").resolve()):
        message = refused(claim_output_folder, target, "triton")
        assert "current folder" in message
        refused(replace_folder_atomically, target, lambda staging: None, "triton")
    assert snapshot(parent) == before


def test_a_folder_holding_an_input_is_refused_even_when_marked(tmp_path):
    out = mark(tmp_path / "repo", "triton")
    (out / "deep").mkdir()
    onnx = out / "deep" / "model.onnx"
    onnx.write_bytes(b"graph")
    before = snapshot(out)
    message = refused(claim_output_folder, out, "triton", inputs=[onnx])
    assert str(onnx) in message and str(out) in message
    refused(replace_folder_atomically, out, lambda staging: None, "triton", inputs=[tmp_path / "repo" / "." / "deep"])
    refused(claim_output_folder, out / "deep", "triton", inputs=[out / "deep"])  # the folder is the input
    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    refused(claim_output_folder, link, "triton", inputs=[onnx])  # through a symlink
    refused(claim_output_folder, out, "triton", inputs=[link / "deep" / "model.onnx"])
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["link", "repo"]
    claim_output_folder(tmp_path / "other", "triton", inputs=[onnx])  # a folder beside is fine


def test_another_owner_a_corrupt_and_a_newer_marker_are_refused(tmp_path):
    out = mark(tmp_path / "out", "export")
    message = refused(claim_output_folder, out, "triton")
    assert "saexport export" in message and str(out) in message
    (out / MARKER).write_text("not json")
    assert MARKER in refused(claim_output_folder, out, "export")
    (out / MARKER).write_text('{"owner": "export", "version": 99}')
    assert "newer saexport" in refused(claim_output_folder, out, "export")
    (out / MARKER).unlink()
    (out / MARKER).mkdir()
    refused(claim_output_folder, out, "export")


def test_a_file_target_and_a_target_under_a_file_are_refused(tmp_path):
    file = tmp_path / "model.onnx"
    file.write_bytes(b"graph")
    message = refused(claim_output_folder, file, "triton")
    assert str(file) in message and "a file" in message
    message = refused(claim_output_folder, file / "repo" / "deeper", "triton")
    assert str(file) in message and "a file" in message
    refused(replace_folder_atomically, file / "repo", lambda staging: None, "triton")
    assert file.read_bytes() == b"graph" and sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_the_caller_names_its_option(tmp_path):
    assert "--repo" in refused(claim_output_folder, build_like(tmp_path / "out"), "triton", option="--repo")


# ---------------------------------------------------------------------------------------------- accepted


def test_new_empty_and_own_folders_are_accepted(tmp_path, umask022):
    new = tmp_path / "new" / "deeper" / "out"
    assert claim_output_folder(new, "build") == new
    assert read_owner(new) == "build"
    for folder in (tmp_path / "new", tmp_path / "new" / "deeper", new):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
    assert stat.S_IMODE((new / MARKER).stat().st_mode) == 0o644

    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    claim_output_folder(empty, "triton")
    assert read_owner(empty) == "triton"

    only_lock = tmp_path / "only_lock"
    only_lock.mkdir()
    (only_lock / LOCK_NAME).write_text("")
    claim_output_folder(only_lock, "export")

    own = build_like(tmp_path / "own", marker_owner="build")
    before = snapshot(own)
    claim_output_folder(own, "build")  # again: idempotent, nothing touched
    assert snapshot(own) == before
    assert check_output_folder(tmp_path / "never" / "made", "build") == tmp_path / "never" / "made"
    assert not (tmp_path / "never").exists()  # a check writes nothing


def test_folders_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        claim_output_folder(tmp_path / "a" / "b", "build")
        replace_folder_atomically(tmp_path / "repo", lambda staging: None, "triton")
        with temporary_folder(tmp_path, ".export-") as tmp:
            assert stat.S_IMODE(tmp.stat().st_mode) == 0o750
    finally:
        os.umask(old)
    for folder in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "repo"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o750, folder


def test_adopt_accepts_an_older_saexport_folder_and_marks_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "build.json").write_text("{}")
    refused(claim_output_folder, out, "build")
    assert claim_output_folder(out, "build", adopt=lambda f: (f / "build.json").is_file()) == out
    assert read_owner(out) == "build" and (out / "build.json").read_text() == "{}"


def test_two_owners_racing_for_a_new_folder_cannot_both_win(tmp_path):
    out = tmp_path / "out"
    claim_output_folder(out, "triton")
    assert "saexport triton" in refused(claim_output_folder, out, "build")
    assert read_owner(out) == "triton"

    raced = tmp_path / "raced"
    raced.mkdir()
    (raced / "build.json").write_text("{}")

    def rival_wins(folder: Path) -> bool:  # runs after the check, before our marker: the rival's lands first
        mark(folder, "triton")
        return True

    assert "saexport triton" in refused(claim_output_folder, raced, "build", adopt=rival_wins)
    assert read_owner(raced) == "triton"


# ---------------------------------------------------------------------------------------------- replacement


def write_repo(version: str):
    def build(staging: Path) -> None:
        (staging / "wan_dit" / "1").mkdir(parents=True)
        (staging / "wan_dit" / "config.pbtxt").write_text(f"version {version}\n")
        (staging / "wan_dit" / "1" / "model.onnx").write_bytes(version.encode() * 100)
    return build


def test_replacement_puts_the_new_folder_in_and_leaves_nothing_beside(tmp_path, umask022):
    repo = tmp_path / "repo"
    assert replace_folder_atomically(repo, write_repo("one"), "triton") == repo
    assert (repo / "wan_dit" / "config.pbtxt").read_text() == "version one\n"
    assert stat.S_IMODE(repo.stat().st_mode) == 0o755
    replace_folder_atomically(repo, write_repo("two"), "triton")
    assert (repo / "wan_dit" / "config.pbtxt").read_text() == "version two\n"
    assert (repo / "wan_dit" / "1" / "model.onnx").read_bytes() == b"two" * 100
    assert read_owner(repo) == "triton"
    assert stat.S_IMODE(repo.stat().st_mode) == 0o755
    assert siblings(repo) == ["repo"]  # no staging, old or lock file left


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_a_failed_build_keeps_the_old_folder_byte_for_byte(tmp_path, failure):
    repo = tmp_path / "repo"
    replace_folder_atomically(repo, write_repo("one"), "triton")
    before = snapshot(repo)

    def broken(staging: Path) -> None:
        write_repo("two")(staging)
        raise failure("killed mid-write")

    with pytest.raises(failure):
        replace_folder_atomically(repo, broken, "triton")
    assert snapshot(repo) == before and siblings(repo) == ["repo"]  # the parent's mtime moved: staging came and went


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    """Fault injection on one call (the files stay real): renaming the staging folder onto the target fails
    after the old folder was moved aside, as EXDEV or EIO would."""
    repo = tmp_path / "repo"
    replace_folder_atomically(repo, write_repo("one"), "triton")
    before, real_rename = snapshot(repo), os.rename

    def rename(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".repo.staging-"):
            raise OSError(errno.EIO, "injected failure", str(src))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    assert "injected failure" in refused(replace_folder_atomically, repo, write_repo("two"), "triton")
    monkeypatch.undo()
    assert snapshot(repo) == before and siblings(repo) == ["repo"]


def test_a_replaced_folder_with_a_users_file_added_is_refused(tmp_path):
    repo = tmp_path / "repo"
    replace_folder_atomically(repo, write_repo("one"), "triton")
    (repo / "wan_dit" / "my_notes.md").write_text("mine")
    before = snapshot(repo)
    message = refused(replace_folder_atomically, repo, write_repo("two"), "triton")
    assert "wan_dit/my_notes.md" in message
    assert snapshot(repo) == before and siblings(repo) == ["repo"]


def test_a_replaced_folder_with_a_file_edited_by_hand_is_refused_unless_overwrite(tmp_path):
    repo = tmp_path / "repo"
    replace_folder_atomically(repo, write_repo("one"), "triton")
    config = next(repo.rglob("*.pbtxt"))
    config.write_text(config.read_text() + "\n# tuned by hand\n")
    before = snapshot(repo)
    message = refused(replace_folder_atomically, repo, write_repo("two"), "triton")
    assert config.relative_to(repo).as_posix() in message and "`overwrite`" in message
    assert snapshot(repo) == before and siblings(repo) == ["repo"]
    replace_folder_atomically(repo, write_repo("two"), "triton", overwrite=True)
    assert "tuned by hand" not in config.read_text()


def test_an_empty_unmarked_folder_is_replaced(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    replace_folder_atomically(repo, write_repo("one"), "triton")
    assert read_owner(repo) == "triton" and (repo / "wan_dit").is_dir()


SLOW_REPLACE = """
import sys, time
from pathlib import Path
from saexport.folders import staged_folder
with staged_folder(sys.argv[1], "triton") as staging:
    (staging / "half.bin").write_bytes(b"x" * 1000)
    print(staging, flush=True)
    sys.stdin.read()
"""


def test_a_killed_replacement_leaves_the_old_folder_and_its_staging_is_cleaned(tmp_path):
    repo = tmp_path / "repo"
    replace_folder_atomically(repo, write_repo("one"), "triton")
    before = snapshot(repo)
    child = python(SLOW_REPLACE, str(repo))
    staging = Path(readline(child.stdout).strip())
    assert staging.parent == tmp_path and staging.name.startswith(".repo.staging-")
    message = refused(replace_folder_atomically, repo, write_repo("two"), "triton")  # it holds the lock
    assert f"pid {child.pid}" in message and str(repo) in message
    kill(child)
    assert staging.is_dir() and (tmp_path / ".repo.saexport.lock").exists()  # what SIGKILL leaves
    assert snapshot(repo) == before
    replace_folder_atomically(repo, write_repo("two"), "triton")
    assert (repo / "wan_dit" / "config.pbtxt").read_text() == "version two\n"
    assert siblings(repo) == ["repo"]


def test_a_kill_between_the_two_renames_is_recovered(tmp_path):
    """The state a SIGKILL between `repo -> .repo.old-*` and `staging -> repo` leaves: the old one comes back."""
    repo = tmp_path / "repo"
    replace_folder_atomically(repo, write_repo("one"), "triton")
    before = snapshot(repo)
    pid, host = dead_pid(), folders._host_tag()
    repo.rename(tmp_path / f".repo.old-{pid}-{host}-0badc0de")
    staged = tmp_path / f".repo.staging-{pid}-{host}-0badf00d"
    staged.mkdir()
    (staged / "whatever").write_text("complete or not, unknown")

    def broken(staging: Path) -> None:
        raise RuntimeError("fails")

    with pytest.raises(RuntimeError):
        replace_folder_atomically(repo, broken, "triton")
    assert snapshot(repo) == before
    assert siblings(repo) == ["repo"]


# ---------------------------------------------------------------------------------------------- stale leftovers


HOLD_TEMPORARY = """
import sys
from saexport.folders import temporary_folder
with temporary_folder(sys.argv[1], ".export-") as tmp:
    (tmp / "model.onnx.data").write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    sys.stdin.read()
"""


def test_clean_stale_removes_a_killed_runs_folder_and_keeps_live_ones(tmp_path):
    killed, alive = python(HOLD_TEMPORARY, str(tmp_path)), python(HOLD_TEMPORARY, str(tmp_path))
    killed_dir, alive_dir = Path(readline(killed.stdout).strip()), Path(readline(alive.stdout).strip())
    kill(killed)
    try:
        assert killed_dir.is_dir() and killed_dir.name.startswith(f".export-{killed.pid}-")
        with temporary_folder(tmp_path, ".export-") as mine:
            assert clean_stale(tmp_path, ".export-") == [killed_dir]
            assert not killed_dir.exists() and alive_dir.is_dir() and mine.is_dir()
        assert not mine.exists()
    finally:
        alive.stdin.close()
        alive.wait(timeout=20)
    assert not alive_dir.exists()  # its own exit cleaned it


def test_clean_stale_by_age_host_and_name(tmp_path):
    pid, host, day_ago = dead_pid(), folders._host_tag(), time.time() - 86400
    dead_file = tmp_path / f".export-{pid}-{host}-00000001"
    dead_file.write_text("a staged file")
    other_host = tmp_path / f".export-{pid}-ffffffff-00000002"
    other_host.mkdir()
    fresh_legacy = tmp_path / ".export-k2j9x_a1"  # tempfile's name: no pid, judged by age
    fresh_legacy.mkdir()
    old_legacy = tmp_path / ".export-zz9_q0b3"
    (old_legacy / "sub").mkdir(parents=True)
    (old_legacy / "sub" / "model.onnx").write_text("x")
    for p in (old_legacy / "sub" / "model.onnx", old_legacy / "sub", old_legacy):
        os.utime(p, (day_ago, day_ago))
    long_export = tmp_path / ".export-long_run"  # an old folder with a file written a second ago: alive
    long_export.mkdir()
    (long_export / "model.onnx.data").write_text("growing")
    os.utime(long_export, (day_ago, day_ago))
    outside = tmp_path / "keep"
    outside.mkdir()
    (outside / "precious").write_text("x")
    link = tmp_path / f".export-{pid}-{host}-00000003"
    link.symlink_to(outside, target_is_directory=True)
    user = tmp_path / f"export-{pid}-{host}-00000004"  # not hidden: never ours
    user.mkdir()

    removed = clean_stale(tmp_path, ".export-")
    assert sorted(removed) == sorted([dead_file, old_legacy, link])
    assert other_host.is_dir() and fresh_legacy.is_dir() and long_export.is_dir() and user.is_dir()
    assert (outside / "precious").read_text() == "x"
    assert not os.path.lexists(link)
    assert clean_stale(tmp_path, ".export-", max_age_s=0) == sorted([fresh_legacy, long_export, other_host])
    assert clean_stale(tmp_path / "missing", ".export-") == []
    with pytest.raises(ValueError):
        clean_stale(tmp_path, "export-")


# ---------------------------------------------------------------------------------------------- preflight


def test_file_targets(tmp_path):
    out = tmp_path / "not" / "yet" / "video.GIF"
    assert check_writable_file_target(out, (".gif", ".mp4")) == out
    assert not (tmp_path / "not").exists()
    message = refused(check_writable_file_target, tmp_path / "video.avi", (".gif", ".mp4", ".safetensors"))
    assert ".avi" in message and ".gif, .mp4, .safetensors" in message
    assert "(none)" in refused(check_writable_file_target, tmp_path / "video", (".gif",))
    file = tmp_path / "file"
    file.write_text("x")
    message = refused(check_writable_file_target, file / "video.gif", (".gif",))
    assert str(file) in message and "a file" in message
    (tmp_path / "dir.gif").mkdir()
    assert "a folder" in refused(check_writable_file_target, tmp_path / "dir.gif", (".gif",))
    assert "regular file" in refused(check_writable_file_target, "/dev/null")
    assert "input" in refused(check_writable_file_target, file, inputs=[tmp_path / "." / "file"])
    ckpt = tmp_path / "ckpt" / "transformer"
    ckpt.mkdir(parents=True)
    assert "inside the input" in refused(check_writable_file_target, ckpt / "new.safetensors", inputs=[ckpt.parent])
    # An existing file is someone's: replaced only when recognised as saexport's, or with overwrite.
    assert "`overwrite`" in refused(check_writable_file_target, file)
    assert check_writable_file_target(file, ours=lambda path: path.read_text() == "x") == file
    assert "`overwrite`" in refused(check_writable_file_target, file, ours=lambda path: False)
    assert check_writable_file_target(file, overwrite=True) == file
    assert file.read_text() == "x"  # a check writes nothing


def test_os_errors_become_one_line(tmp_path):
    with pytest.raises(SaexportError) as info, plain_os_errors("/dev/full"), open("/dev/full", "w") as f:
        f.write("x")
        f.flush()
    assert "/dev/full" in str(info.value) and "no space left" in str(info.value)
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(SaexportError) as info, plain_os_errors():
        (file / "sub" / "model.onnx").parent.mkdir(parents=True)
    assert f"{file} is a file" in str(info.value) and "\n" not in str(info.value)


def as_unprivileged(call) -> str:
    """'ok' or the SaexportError message of `call()` run as uid/gid 65534 in a forked child (root bypasses
    permission bits, so only a real unprivileged process shows what EACCES does)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        os.close(read_end)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                call()
                result = "ok"
            except SaexportError as e:
                result = f"refused {e}"
        except BaseException as e:  # noqa: B036 - anything, reported to the parent
            result = f"crash {e!r}"
        os.write(write_end, result.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        result = f.read()
    os.waitpid(pid, 0)
    if result.startswith("crash PermissionError") and "setuid" in result.lower():
        pytest.skip(f"cannot drop privileges here: {result}")
    assert not result.startswith("crash"), result
    return result


def test_a_read_only_parent_is_refused_before_compute():
    """tmp_path sits in a 0700 folder an unprivileged uid cannot enter: a 0755 folder under /tmp instead."""
    base = Path(tempfile.mkdtemp(prefix="saexport-test-"))
    try:
        base.chmod(0o755)
        ro = base / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        (base / "rw").mkdir()
        (base / "rw").chmod(0o777)
        if os.geteuid() == 0:
            run = as_unprivileged
        else:
            def run(call):
                try:
                    call()
                    return "ok"
                except SaexportError as e:
                    return f"refused {e}"
            if os.access(ro, os.W_OK):
                pytest.skip("this user may write a 0555 folder (a capability?): no EACCES to test")
        checks = {
            "check": lambda: check_output_folder(ro / "out", "build"),
            "check existing": lambda: check_output_folder(ro, "build"),
            "claim": lambda: claim_output_folder(ro / "out" / "deeper", "build"),
            "existing": lambda: claim_output_folder(ro, "build"),
            "replace": lambda: replace_folder_atomically(ro / "repo", write_repo("one"), "triton"),
            "file": lambda: check_writable_file_target(ro / "video.gif", (".gif",)),
            "lock": lambda: FolderLock(ro).acquire(),
        }
        for name, call in checks.items():
            result = run(call)
            assert result.startswith("refused "), (name, result)
            assert str(ro) in result and "\n" not in result, (name, result)
            assert "permission denied" in result, (name, result)
        assert sorted(os.listdir(ro)) == []
        assert run(lambda: claim_output_folder(base / "rw" / "out", "build")) == "ok"  # the child can write here
        assert stat.S_IMODE((base / "rw" / "out").stat().st_mode) == 0o777 & ~folders._umask()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- lock


HOLDER = """
import sys
from saexport.folders import FolderLock
with FolderLock(sys.argv[1], command="saexport build --out " + sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""

CONTENDER = """
import sys
from saexport.errors import SaexportError
from saexport.folders import FolderLock
try:
    with FolderLock(sys.argv[1], timeout=float(sys.argv[2]), poll_s=0.02):
        print("acquired", flush=True)
except SaexportError as e:
    print(e, file=sys.stderr)
    sys.exit(3)
"""


def contend(folder: Path, timeout: float = 0.0) -> subprocess.CompletedProcess:
    child = python(CONTENDER, str(folder), str(timeout))
    try:
        out, err = child.communicate(timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        kill(child)
        pytest.fail(f"FolderLock(timeout={timeout}) did not return")
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def test_a_second_process_refuses_naming_the_holder_then_gets_the_lock(tmp_path):
    out = claim_output_folder(tmp_path / "out", "build")
    holder = python(HOLDER, str(out))
    assert readline(holder.stdout) == "locked\n"
    try:
        second = contend(out)
        assert second.returncode == 3, second
        message = second.stderr.strip()
        assert "\n" not in message
        assert f"pid {holder.pid}" in message and f"`saexport build --out {out}`" in message
        assert str(out) in message and "--out" in message
    finally:
        holder.stdin.close()
        holder.wait(timeout=20)
    assert contend(out).stdout == "acquired\n"
    assert sorted(os.listdir(out)) == [MARKER]  # the lock file goes with the lock


def test_a_waiting_process_says_who_it_waits_for_and_proceeds(tmp_path):
    out = claim_output_folder(tmp_path / "out", "build")
    holder = python(HOLDER, str(out))
    assert readline(holder.stdout) == "locked\n"
    waiter = python(CONTENDER, str(out), "60")
    try:
        line = readline(waiter.stderr)
        assert line.startswith("waiting for another saexport") and f"pid {holder.pid}" in line, line
        assert waiter.poll() is None
    finally:
        holder.stdin.close()
        holder.wait(timeout=20)
    out_text, _ = waiter.communicate(timeout=60)
    assert waiter.returncode == 0 and out_text == "acquired\n"


def test_a_timed_wait_gives_up_with_the_holders_pid(tmp_path):
    out = claim_output_folder(tmp_path / "out", "build")
    with FolderLock(out, command="saexport triton --out x"):
        second = contend(out, timeout=0.3)
    assert second.returncode == 3
    assert f"pid {os.getpid()}" in second.stderr and "0.3 s later" in second.stderr
    assert "`saexport triton --out x`" in second.stderr


def test_a_killed_holders_lock_file_does_not_block(tmp_path):
    out = claim_output_folder(tmp_path / "out", "build")
    holder = python(HOLDER, str(out))
    assert readline(holder.stdout) == "locked\n"
    kill(holder)
    assert str(holder.pid) in (out / LOCK_NAME).read_text()  # the file stays, the kernel lock does not
    with FolderLock(out) as lock:
        assert lock.held and str(os.getpid()) in (out / LOCK_NAME).read_text()
    assert not (out / LOCK_NAME).exists()


def test_the_lock_is_released_on_an_exception(tmp_path):
    out = claim_output_folder(tmp_path / "out", "build")
    with pytest.raises(ValueError), FolderLock(out):
        raise ValueError("boom")
    assert contend(out).stdout == "acquired\n"


def test_the_lock_nests_within_a_process(tmp_path):
    out = claim_output_folder(tmp_path / "out", "build")
    with FolderLock(out):
        with FolderLock(out):
            pass
        still = contend(out)
        assert still.returncode == 3 and f"pid {os.getpid()}" in still.stderr
    assert contend(out).returncode == 0
