"""Safe outputs: an output never destroys an input, and special files stay special.

Every file the library writes (the certify report, a trained ONNX model, training
checkpoints and metrics) goes through this module. Two rules:

1. **An output is never an input.** :func:`check_outputs` raises
   :class:`~lirpa_patch.errors.UsageError`, naming the output's parameter, when an
   output path is the same file as something the run reads (the model, a data file
   or a dataset file of a data directory, a mask file, a checkpoint being resumed),
   or when two outputs are the same file. "The same file" means the same inode
   (after following symlinks, so hard links and symlinks count) or the same real
   path. Call it before anything is written, so that nothing is touched.
   Character devices (``/dev/null``) are exempt: writing into them destroys nothing.

2. **Write like Unix tools** (``cmd > path``):

   * a character device, block device or FIFO is written *into*: opened for
     writing, no temporary file, no rename (``/dev/null`` stays a device, a reader
     on a FIFO receives the bytes);
   * a symlink is followed: its target is written and the link stays a link
     (a dangling link creates its target);
   * a regular file (or the target of a symlink) is replaced atomically: a
     temporary file in the target's folder, ``fsync``, then a rename. An
     interrupted write leaves the previous file intact. The new file keeps the old
     file's permission bits (a new file gets ``0666`` minus the umask).

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator, Mapping, Optional, Union

from .errors import LirpaPatchError, UsageError

PathLike = Union[str, "os.PathLike[str]"]
Files = Union[PathLike, Iterable[PathLike], None]

__all__ = ["check_outputs", "check_writable", "open_output", "output_folder", "same_file", "write_output"]


def _target(path: PathLike) -> Path:
    """Where the bytes of ``path`` go: every symlink followed (also a dangling one)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _stat(path: PathLike) -> Optional[os.stat_result]:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def _is_char_device(path: PathLike) -> bool:
    st = _stat(path)
    return st is not None and stat.S_ISCHR(st.st_mode)


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same file: same inode (hard links, symlinks) or same real path."""
    sa, sb = _stat(a), _stat(b)
    if sa is not None and sb is not None:
        return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
    return _target(a) == _target(b)


def _as_list(files: Files) -> list[PathLike]:
    if files is None:
        return []
    if isinstance(files, (str, os.PathLike)):
        return [files]
    return [f for f in files if f is not None]


def check_outputs(
    outputs: Mapping[str, Optional[PathLike]],
    inputs: Mapping[str, Files],
    *,
    allow: Iterable[tuple[str, str]] = (),
) -> None:
    """Refuse outputs that would overwrite an input of the run, or each other.

    Args:
        outputs: parameter name -> the path it writes (None: nothing written).
        inputs: parameter name -> the file or files it reads (a data directory is given
            as the dataset files in it, see :func:`lirpa_patch.data.source_files`).
        allow: ``(output, input)`` parameter pairs that may be the same file, e.g.
            ``("checkpoint", "resume")``: resuming writes the checkpoint it continues.

    Raises:
        UsageError: with ``param`` the output's parameter, naming the input it would destroy.
    """
    allowed = {(o, i) for o, i in allow}
    items = [(name, path) for name, path in outputs.items() if path is not None]
    for out_name, out_path in items:
        if _is_char_device(out_path):
            continue
        for in_name, files in inputs.items():
            if (out_name, in_name) in allowed:
                continue
            for in_path in _as_list(files):
                if same_file(out_path, in_path):
                    shown = "" if os.fspath(in_path) == os.fspath(out_path) else f" {os.fspath(in_path)}"
                    raise UsageError(
                        f"{out_name} {os.fspath(out_path)} is the same file as {in_name}{shown}, an input of "
                        f"this run; writing it would destroy that input (choose another path)",
                        param=out_name, related=(in_name,),
                    )
    for i, (first, first_path) in enumerate(items):
        for second, second_path in items[i + 1 :]:
            if not _is_char_device(first_path) and same_file(first_path, second_path):
                raise UsageError(
                    f"{second} {os.fspath(second_path)} is the same file as {first}; two outputs would "
                    f"overwrite each other (choose another path)",
                    param=second, related=(first,),
                )


def check_writable(path: PathLike, *, what: str = "the output") -> Path:
    """Fail early (before any work) when ``path`` cannot be written; return where the bytes will go.

    Raises:
        LirpaPatchError: ``path`` is a folder, its folder is missing or not writable,
            or the file (or the device or FIFO it names) is not writable.
    """
    shown = os.fspath(path)
    target = _target(path)
    st = _stat(target)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise LirpaPatchError(f"cannot write {what} to {shown}: it is a directory")
    if st is not None and stat.S_ISSOCK(st.st_mode):
        raise LirpaPatchError(f"cannot write {what} to {shown}: it is a socket")
    if st is not None and not stat.S_ISREG(st.st_mode):
        if not os.access(target, os.W_OK):
            raise LirpaPatchError(f"cannot write {what} to {shown}: it is not writable")
        return target
    folder = target.parent
    if not folder.is_dir():
        raise LirpaPatchError(f"cannot write {what} to {shown}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LirpaPatchError(f"cannot write {what} to {shown}: folder {folder} is not writable")
    if st is not None and not os.access(target, os.W_OK):
        raise LirpaPatchError(f"cannot write {what} to {shown}: the file is not writable")
    return target


def output_folder(path: PathLike, *, create: bool = True, what: str = "the output folder") -> Path:
    """A folder to write several outputs into (pictures, arrays): created when missing (its
    parent must exist; with ``create=False`` only checked, so a run can check before any
    work), refused when it is something else; the files in it are written with
    :func:`write_output`.

    Raises:
        LirpaPatchError: ``path`` exists and is not a folder, its parent folder is missing,
            or it cannot be created or written.
    """
    shown = os.fspath(path)
    target = _target(path)
    st = _stat(target)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise LirpaPatchError(f"cannot write {what} {shown}: it exists and is not a folder")
    if st is None:
        if not target.parent.is_dir():
            raise LirpaPatchError(f"cannot create {what} {shown}: folder {target.parent} does not exist")
        if not create:
            if not os.access(target.parent, os.W_OK | os.X_OK):
                raise LirpaPatchError(f"cannot create {what} {shown}: folder {target.parent} is not writable")
            return Path(os.fspath(path))
        try:
            target.mkdir()
        except OSError as exc:
            raise LirpaPatchError(f"cannot create {what} {shown}: {exc.strerror or exc}") from None
    if not os.access(target, os.W_OK | os.X_OK):
        raise LirpaPatchError(f"cannot write {what} {shown}: the folder is not writable")
    return Path(os.fspath(path))


def _new_file_mode(target: Path) -> int:
    """The permission bits of the existing file, else 0666 minus the umask."""
    st = _stat(target)
    if st is not None:
        return stat.S_IMODE(st.st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def open_output(path: PathLike, *, binary: bool = True, what: str = "the output") -> Iterator[IO]:
    """Open ``path`` for writing as described in the module docstring; yields a file object.

    The file is complete only when the ``with`` block ends without an exception; on an
    exception a regular file keeps its previous content and no temporary file is left.

    Raises:
        LirpaPatchError: the file cannot be written.
    """
    shown = os.fspath(path)
    target = check_writable(path, what=what)
    mode = "wb" if binary else "w"
    encoding = None if binary else "utf-8"
    st = _stat(target)
    tmp: Optional[str] = None
    try:
        if st is not None and not stat.S_ISREG(st.st_mode):
            with open(target, mode, encoding=encoding) as handle:  # write into the device or FIFO
                yield handle
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _new_file_mode(target))  # mkstemp creates 0600
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise LirpaPatchError(f"cannot write {what} to {shown}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_output(path: PathLike, data: Union[bytes, str], *, what: str = "the output") -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` with :func:`open_output`; return the path written."""
    with open_output(path, binary=isinstance(data, bytes), what=what) as f:
        f.write(data)
    return Path(os.fspath(path))
