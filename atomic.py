"""Writing files and directories so that a crash never tears them: the one way this project
writes anything a user keeps (shards, checkpoints, adapters, exports).

Read top to bottom:
  write_file / write_dir   into a temporary name, then renamed; a kill at any instant leaves the
                           old or the new, never a mix
  settle                   finishes a directory replacement that a crash interrupted
  DiskFullError            ENOSPC, said in words, naming what is still intact

A directory cannot be replaced in one atomic step, so write_dir replaces it in renames, each of
which is atomic, and only ever gives a *complete* directory one of the names a reader trusts:

    DIR.tmp    being written (never trusted; discarded by the next write)
    DIR.new    complete, not yet swapped in            DIR -> DIR.old
    DIR        complete                                DIR.new -> DIR
    DIR.old    complete, the one DIR replaced          DIR.old discarded

Whatever instant a crash hits, settle(DIR) finds the newest complete copy (DIR.new, else DIR, else
DIR.old) and finishes the swap. Discarding renames first (to NAME.trash) and deletes after, so a
half-deleted directory never carries a trusted name. Plain standard library: data.prepare uses it
without importing torch.
"""

import errno
import glob
import os
import shutil

# Less free space than this after a failed write means the disk filled up (torch.save reports
# ENOSPC as "enforce fail at inline_container.cc", so the exception alone cannot tell).
_FULL_BYTES = 1 << 20


class DiskFullError(OSError):
    """The disk filled up during a write; the message says what is still intact."""


def write_file(path, write, keeps=None):
    """write(tmp_path) writes the file; it then replaces path in one rename. keeps: what a failure
    leaves intact, for the message (default: path itself)."""
    path = os.path.expanduser(str(path))
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        _fsync(tmp)
    except BaseException as e:
        full = _disk_full(e, parent)
        _discard(tmp)
        if full:
            raise _disk_full_error(path, keeps or path) from None
        raise
    os.replace(tmp, path)
    _fsync(parent)


def write_dir(path, write):
    """write(tmp_dir) fills a new directory; it then replaces path as a whole (see the module's
    docstring for the renames). Returns path."""
    path = os.path.normpath(os.path.expanduser(str(path)))
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    settle(path)
    tmp = path + ".tmp"
    _discard(tmp)
    os.makedirs(tmp)
    try:
        write(tmp)
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync(os.path.join(root, name))
        _fsync(tmp)
    except BaseException as e:
        full = _disk_full(e, parent)
        _discard(tmp)
        if full:
            raise _disk_full_error(path, path) from None
        raise
    os.rename(tmp, path + ".new")  # from here on the new copy is complete and trusted
    _fsync(parent)
    settle(path)
    return path


def settle(path):
    """Finish a write_dir that a crash interrupted: afterwards path is the newest complete copy
    (or absent, if there never was one) and no .new, .old or .trash is left beside it."""
    path = os.path.normpath(os.path.expanduser(str(path)))
    new, old = path + ".new", path + ".old"
    if os.path.isdir(new):
        if os.path.isdir(path):
            _discard(old)  # path is complete, so an older .old is not needed
            os.rename(path, old)
        os.rename(new, path)
    elif not os.path.isdir(path) and os.path.isdir(old):
        os.rename(old, path)  # only reachable by hand-made states; keep the one complete copy
    if os.path.isdir(path):
        _discard(old)
    for trash in glob.glob(glob.escape(path) + ".*trash"):
        shutil.rmtree(trash, ignore_errors=True)
    _fsync(os.path.dirname(os.path.abspath(path)))
    return path


def _discard(path):
    """Remove a file or directory; a directory is renamed to PATH.trash first, so a crash midway
    never leaves a partial directory under a name anything trusts."""
    if os.path.isdir(path) and not os.path.islink(path):
        trash = path + ".trash"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _fsync(path):
    """Flush a file's data, or a directory's entries (the renames), to the disk: a power cut after
    a rename must not reveal a name whose contents never reached the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
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
