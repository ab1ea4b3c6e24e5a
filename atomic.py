"""Writing files and directories so that a crash never tears them and nothing that is not ours is
touched: the one way this project writes anything a user keeps (shards, checkpoints, adapters,
exports, results).

Read top to bottom:
  OutputError              an output this project will not write (a symbolic link, an input)
  check_outputs            outputs that resolve to an input, or to each other, refused up front
  write_file / write_dir   into a temporary name, then swapped in; a kill at any instant leaves the
                           old or the new, never a mix
  open_own                 a file kept inside an output (a lock, a log), opened without following links
  recover / readable       finish a directory swap that a crash interrupted (writers and readers)
  DiskFullError            ENOSPC, said in words, naming what is still intact

Only what is ours is touched. Every temporary name is `.NAME.TOKEN.STATE` beside NAME, TOKEN a fresh
random one per write, and a directory carries a marker file `.atomic-TOKEN` while it is ours to
rename or delete. A sibling is adopted or deleted only when its name *and* its marker say it is one
of ours (a user's `notes.old/` or `notes.new/` is never looked at); an unmarked one is only ever
removed with rmdir, which cannot delete anything but an empty directory.

A directory is written to `.NAME.TOKEN.tmp`, renamed `.NAME.TOKEN.new` once complete, then swapped
with NAME in one atomic step (Linux renameat2 RENAME_EXCHANGE), so NAME always names a complete
copy; the copy it replaced, now at the `.new` name, is renamed `.old`, marked and deleted. Where the file
system cannot exchange (NFS, Lustre, macOS), NAME is renamed aside (`.NAME.TOKEN.old`) and the new
copy renamed in: a kill between the two leaves no NAME, and recover(), which every reader of a
directory calls through readable(), puts the complete copy back. The states, TOKEN fixed:

    .tmp marked              being written, or abandoned (its writer is gone): discarded
    .new marked              complete, not yet swapped in: swapped in
    .new or .old unmarked,   the copy NAME replaced: renamed .old, given the marker, discarded
      NAME marked
    .old marked              the replaced copy, being deleted: discarded
    any other, empty         killed just after mkdir, or just before rmdir: rmdir
    NAME marked, alone       swapped in, marker not yet removed: marker removed

Plain standard library (and cli.py's error class): data.prepare uses it without importing torch.
"""

import contextlib
import ctypes
import errno
import fcntl
import fnmatch
import os
import re
import secrets
import shutil
import socket

from cli import UsageError

# Less free space than this after a failed write means the disk filled up (torch.save reports
# ENOSPC as "enforce fail at inline_container.cc", so the exception alone cannot tell).
_FULL_BYTES = 1 << 20
_MARK = ".atomic-"


class OutputError(UsageError):
    """An output this project will not write; one line, exit status 2 (cli.py: a bad command line)."""


class DiskFullError(OSError):
    """The disk filled up during a write; the message says what is still intact."""


# -----------------------------------------------------------------------------------------------
# Outputs against inputs, before any work starts


def check_outputs(outputs, inputs, input_files=()):
    """outputs, inputs: {flag: path} or [(flag, path)] (a None path skipped). Refuse, naming both
    flags, an output that is a symbolic link, or that resolves (links followed) to an input or
    contains one (a directory output is replaced whole), or lies inside an input directory under a
    name in input_files (fnmatch patterns: the files such an input consists of), or is another
    output or holds it. Called before any work starts."""
    real_in = [(flag, path, os.path.realpath(path)) for flag, path in _pairs(inputs)]
    real_out = []
    for flag, path in _pairs(outputs):
        if os.path.islink(path):
            raise OutputError(f"{flag} {path} is a symbolic link (to {os.readlink(path)}); name the file "
                              f"or directory itself")
        out = os.path.realpath(path)
        for other, given, theirs in real_in:
            if out == theirs or _inside(theirs, out):
                raise OutputError(f"{flag} {path} would overwrite {other} {given}; choose another {flag}")
            if _inside(out, theirs) and any(fnmatch.fnmatch(os.path.basename(out), p) for p in input_files):
                raise OutputError(f"{flag} {path} would overwrite a file of {other} {given}; choose another {flag}")
        for other, given, theirs in real_out:
            if out == theirs or _inside(out, theirs) or _inside(theirs, out):
                raise OutputError(f"{flag} {path} and {other} {given} are the same place; choose another {flag}")
        real_out.append((flag, path, out))


def _pairs(given):
    items = given.items() if isinstance(given, dict) else given
    return [(flag, os.path.expanduser(str(path))) for flag, path in items if path]


def _inside(path, directory):
    return path.startswith(directory.rstrip(os.sep) + os.sep)


# -----------------------------------------------------------------------------------------------
# Writing


def write_file(path, write, keeps=None):
    """write(tmp_path) writes the file; it then replaces path in one rename (a link at path is
    refused, never written through). keeps: what a failure leaves intact, for the message
    (default: path itself)."""
    path = os.path.expanduser(str(path))
    _refuse_link(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    try:
        write(tmp)
        _fsync(tmp)
    except BaseException as e:
        full = _disk_full(e, parent)
        if os.path.lexists(tmp) and not os.path.isdir(tmp):
            os.remove(tmp)
        if full:
            raise _disk_full_error(path, keeps or path) from None
        raise
    os.replace(tmp, path)
    _fsync(parent)


def write_dir(path, write):
    """write(tmp_dir) fills a new directory; it then replaces path as a whole (see the module's
    docstring). Returns path."""
    path = os.path.normpath(os.path.expanduser(str(path)))
    _refuse_link(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{path} exists and is not a directory; not replacing it")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    recover(path)
    token = secrets.token_hex(8)
    tmp = _sibling(path, token, "tmp")
    os.mkdir(tmp)
    try:
        with open(os.path.join(tmp, _MARK + token), "x") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        write(tmp)
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync(os.path.join(root, name))
        _fsync(tmp)
    except BaseException as e:
        full = _disk_full(e, parent)
        _discard(tmp, token)
        if full:
            raise _disk_full_error(path, path) from None
        raise
    os.rename(tmp, _sibling(path, token, "new"))  # from here on the new copy is complete
    _fsync(parent)
    recover(path)
    return path


def _refuse_link(path):
    if os.path.islink(path):
        raise OutputError(f"{path} is a symbolic link (to {os.readlink(path)}); not writing through it: "
                          f"name the file or directory itself")


def open_own(path, flags, mode=0o644):
    """os.open of a file a command keeps inside its output directory (a lock, a log), never through
    a symbolic link: a link planted there would have the command truncate or append to its target."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(f"{path} is a symbolic link (to {os.readlink(path)}); not writing through it: "
                              f"remove it or choose another output") from None
        raise


# -----------------------------------------------------------------------------------------------
# Recovering: our own interrupted swaps, and nothing else


def readable(path):
    """path, after finishing a swap a crash interrupted if path is missing (a reader's call: where
    it may not rename, it reads what is there). A complete path is read as it is, even if a marker
    file is left in it: a reader never renames beside a copy that a writer may be swapping."""
    path = os.path.normpath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        try:
            recover(path)
        except OSError:
            pass
    return path


def recover(path):
    """Finish every write_dir of path that a crash interrupted (the states in the module's
    docstring): afterwards path is the newest complete copy, or absent if there never was one,
    and none of our temporaries is left beside it. Returns path."""
    path = os.path.normpath(os.path.expanduser(str(path)))
    with _locked(os.path.dirname(os.path.abspath(path))):
        _recover(path)
    return path


def _recover(path):
    for token, state in _ours(path):
        sibling = _sibling(path, token, state)
        if not os.path.isdir(sibling) or os.path.islink(sibling):
            continue  # handled with an earlier one, or not a directory we could have made
        if _marked(sibling, token):
            if state == "new":
                _swap_in(path, token)
            elif state == "old" or not _writer_alive(sibling, token):
                _discard(sibling, token)
        elif _marked(path, token):
            _retire(path, sibling, token)
        else:  # killed after mkdir and before the marker, or after the last delete before rmdir
            _rmdir_if_empty(sibling)
    for name in _marks(path):
        os.remove(os.path.join(path, name))
    _fsync(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def _locked(directory):
    """Hold an exclusive flock on directory while recovering beside it, so two processes (a writer
    and a reader that found no copy) never both exchange the same pair back and forth. Where the
    file system has no such lock (some NFS), it goes on unlocked."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _swap_in(path, token):
    """The complete .new copy becomes path, in one exchange where the file system can; the copy it
    replaced is then retired."""
    new = _sibling(path, token, "new")
    if not os.path.isdir(path):
        os.rename(new, path)
    elif not _exchange(new, path):  # else the old copy now sits at the .new name, unmarked
        os.rename(path, _sibling(path, token, "old"))
        os.rename(new, path)
    _fsync(os.path.dirname(os.path.abspath(path)))
    for state in ("new", "old"):
        if os.path.isdir(_sibling(path, token, state)):
            _retire(path, _sibling(path, token, state), token)


def _retire(path, sibling, token):
    """Delete the copy path replaced: renamed .old first (a marked .new would be swapped back in),
    then given path's marker (so it is ours to delete), then discarded."""
    old = _sibling(path, token, "old")
    if sibling != old:
        os.rename(sibling, old)
    os.rename(os.path.join(path, _MARK + token), os.path.join(old, _MARK + token))
    _discard(old, token)


def _sibling(path, token, state):
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.{token}.{state}")


def _ours(path):
    """(token, state) of every sibling named as one of path's temporaries."""
    head, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(r"\." + re.escape(name) + r"\.([0-9a-f]{16})\.(tmp|new|old)")
    try:
        entries = os.listdir(head)
    except OSError:
        return []
    found = [m.groups() for m in map(pattern.fullmatch, entries) if m]
    return sorted(found, key=lambda ts: "new tmp old".split().index(ts[1]))  # a .new first: it swaps


def _marked(directory, token):
    mark = os.path.join(directory, _MARK + token)
    return os.path.isdir(directory) and not os.path.islink(directory) and os.path.isfile(mark) \
        and not os.path.islink(mark)


def _marks(directory):
    if not os.path.isdir(directory) or os.path.islink(directory):
        return []
    return [n for n in os.listdir(directory) if re.fullmatch(re.escape(_MARK) + r"[0-9a-f]{16}", n)]


def _writer_alive(directory, token):
    """Is the process that is filling this .tmp still running? Unknown (another host) counts as yes."""
    try:
        with open(os.path.join(directory, _MARK + token)) as f:
            host, pid = f.read().split()
        if host != socket.gethostname():
            return True
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError):
        return True
    return True


def _discard(directory, token):
    """Delete a directory of ours: everything but its marker first, the marker last, so a crash
    midway leaves a directory still marked as ours (and discarded next time), never an orphan."""
    if not _marked(directory, token):
        return _rmdir_if_empty(directory)
    for entry in os.scandir(directory):
        if entry.name == _MARK + token:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.remove(entry.path)
    os.remove(os.path.join(directory, _MARK + token))
    os.rmdir(directory)


def _rmdir_if_empty(directory):
    try:
        os.rmdir(directory)
    except OSError:
        pass


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (AttributeError, OSError):  # not Linux, or a C library without it
    _renameat2 = None


def _exchange(a, b):
    """Swap two directories' names in one step; False where the system or file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), a, None, b)


# -----------------------------------------------------------------------------------------------
# Durability and a full disk


def _fsync(path):
    """Flush a file's data, or a directory's entries (the renames), to the disk: a power cut after
    a rename must not reveal a name whose contents never reached the disk."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory
    finally:
        os.close(fd)


def _disk_full(exc, parent) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(parent).free < _FULL_BYTES
    except OSError:
        return False


def _disk_full_error(path, keeps):
    intact = (f"{keeps} is unchanged (still the latest good copy)" if os.path.exists(keeps)
              else "nothing was written")
    return DiskFullError(f"disk full while writing {path}; {intact}. Free some space on "
                         f"{os.path.dirname(os.path.abspath(path))} and try again")
