"""Local paths and object-store URLs (``gs://``, ``s3://``) behind one set of calls.

Every file a run, a command or an export reads or writes goes through here. Local paths use the
local file calls; URLs go through fsspec (the layer under ``etils.epath``, which orbax uses for its
own files): ``gcsfs`` for ``gs://``, ``s3fs`` for ``s3://``. Orbax writes its checkpoint arrays through
tensorstore, which reads and writes ``gs://`` natively; orbax has no ``s3://`` path, so checkpoints
stay on local disk or ``gs://`` (:data:`CHECKPOINT_SCHEMES`).

What differs on an object store, and how it is handled:

- there are no directories: ``makedirs`` is a no-op for URLs, and a "directory" exists when an
  object lies under it;
- there is no append: :class:`AppendText` keeps the text written so far and rewrites the whole
  object at each flush (a training run's metrics files flush every
  ``train.metrics_upload_every_s`` and at each checkpoint, not at every logged step);
- there is no rename of a directory in one call: :func:`rename` copies and deletes, object by
  object; a single object write, though, is atomic (a reader sees the old object or the whole new
  one), so :func:`write_text_atomic` and :func:`copy_file` write the object in one call (not
  through a file object, which commits what it holds when closed, a stopped write's prefix too);
- listings may be cached by the client: every check for existence or listing here asks the store;
- a store that refuses the caller (no credentials: gcsfs then calls anonymously and Cloud Storage
  answers 401; credentials without the permission: 403) raises PermissionError with one line
  that names the URL and what to do, from every call here (gcsfs's own traceback log of the
  refusal is dropped: the error says it).

Files that other libraries read or write only on local disk (safetensors, a tokenizer directory,
TensorBoard event files, TFDS's array_record files) are staged: downloaded into a local cache
(:func:`local_copy`) or written locally and uploaded (:func:`upload_dir`).
"""

from __future__ import annotations

import contextlib
import glob as _glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from typing import IO, Iterator, List, Optional, Sequence

from cloud_jax.errors import ConfigError

log = logging.getLogger(__name__)

# The URL schemes runs accept, and the package each needs.
SCHEMES = {"gs": "gcsfs", "s3": "s3fs"}
# Where orbax can write checkpoints: local disk ("") and gs:// (tensorstore's GCS driver);
# orbax-checkpoint 0.12.8 builds no tensorstore spec for s3://.
CHECKPOINT_SCHEMES = ("", "gs")
_INSTALL = {"gs": "pip install 'cloud-jax[gcs]' (gcsfs)",
            "s3": "pip install 'cloud-jax[s3]' (s3fs)"}


def is_url(path) -> bool:
    return "://" in os.fspath(path)


def scheme(path) -> str:
    return os.fspath(path).split("://", 1)[0] if is_url(path) else ""


def check_path(path: str, what: str) -> None:
    """A ConfigError for a URL this software cannot read or write: an unknown scheme, or one
    whose client library is not installed."""
    if not is_url(path):
        return
    s = scheme(path)
    if s not in SCHEMES:
        raise ConfigError(f"{what}={path!r}: unsupported URL scheme {s!r}; use a local path or "
                          f"{', '.join(k + '://' for k in SCHEMES)}")
    try:
        __import__(SCHEMES[s])
    except ImportError:
        raise ConfigError(f"{what}={path!r} needs the {SCHEMES[s]} package: {_INSTALL[s]}"
                          ) from None


def check_bucket(path: str, what: str) -> None:
    """A ConfigError when ``path`` is a URL in a bucket that does not exist, for an output
    checked before the work whose result it is to hold (the first write would find it missing,
    maybe hours later); a PermissionError when the store refuses a caller without credentials.
    A caller that may not see the bucket itself (only its objects) is let through: its writes
    tell."""
    path = os.fspath(path)
    if not is_url(path):
        return
    bucket = path.split("://", 1)[1].split("/", 1)[0]
    root = f"{scheme(path)}://{bucket}"
    fs, inner = _fs(root)
    try:
        fs.info(inner)
    except FileNotFoundError:
        raise ConfigError(f"{what}={path!r}: no bucket {bucket!r} (or no access to it): create "
                          f"it, or correct the name") from None
    except Exception as err:  # noqa: BLE001 - gcsfs raises its own HttpError
        if _refusal(err) == "credentials":
            raise _refused(path, err, "credentials") from None
        log.debug("%s: bucket %s not checked (%s)", what, bucket, err)


def check_output_dir(path: str, what: str) -> None:
    """:func:`check_path` and :func:`check_bucket`, for an output directory; a ConfigError for a
    path that is a file, a local one or an object (checked before the work, not when the
    directory is made: the files would go under the object's name, beside it)."""
    check_path(path, what)
    check_bucket(path, what)
    if is_url(path):
        try:
            is_file = isfile(path)
        except PermissionError:  # a caller that may write objects but not read them: let through
            is_file = False
    else:
        is_file = os.path.lexists(path) and not os.path.isdir(path)
    if is_file:
        raise ConfigError(f"{what}={os.fspath(path)!r} is a file, not a directory: give a "
                          "directory (a new one, or one that exists)")


def check_output_file(path: str, what: str) -> None:
    """:func:`check_path`, and a ConfigError for a file output that names a directory (one that
    exists, a path ending in a slash, or a bucket without an object name) or lies in a bucket
    that does not exist (:func:`check_bucket`): checked before the work whose result the file is
    to hold, not when it is written."""
    check_path(path, what)
    path = os.fspath(path)
    if is_url(path) and "/" not in path.split("://", 1)[1].rstrip("/"):
        raise ConfigError(f"{what}={path!r} is a bucket, not an object: give a file name in it, "
                          f"e.g. {path.rstrip('/')}/scored.jsonl")
    if path.endswith(("/", os.sep)) or isdir(path):
        raise ConfigError(f"{what}={path!r} is a directory: give a file name")
    check_bucket(path, what)


def resolve(path: str) -> str:
    """An absolute local path, or the URL as it is (without a trailing slash)."""
    path = os.fspath(path)
    return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    base = os.fspath(base)
    if not is_url(base):
        return os.path.join(base, *parts)
    out = base.rstrip("/")
    for part in parts:
        out = part if is_url(part) else f"{out}/{part.strip('/')}"
    return out


def dirname(path: str) -> str:
    path = os.fspath(path)
    if not is_url(path):
        return os.path.dirname(path)
    head, _, _ = path.rstrip("/").rpartition("/")
    return head if "://" in head and not head.endswith(":/") else path


def basename(path: str) -> str:
    return os.fspath(path).rstrip("/").rpartition("/")[2]


def _refusal(err: BaseException) -> Optional[str]:
    """Why the store refused the caller, where ``err`` is such a refusal: "credentials" (gcsfs's
    HttpError 401: no credentials, so an anonymous call, or expired ones; botocore's
    NoCredentialsError), "permission" (gcsfs's OSError "Forbidden" for a 403); else None."""
    name = type(err).__name__
    if (name == "HttpError" and getattr(err, "code", None) == 401) or name == "NoCredentialsError":
        return "credentials"
    if (isinstance(err, OSError) and not isinstance(err, PermissionError) and err.errno is None
            and str(err).startswith("Forbidden")):
        return "permission"
    return None


def _refused(url: str, err: BaseException, kind: str) -> PermissionError:
    said = " ".join(str(err).split()).removeprefix("Forbidden: ")
    if kind == "credentials":
        return PermissionError(
            f"{url}: the store refused the request ({said}): no valid Google Cloud credentials "
            "were found (or they expired); run `gcloud auth application-default login`, or set "
            "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run on a VM whose "
            "service account may use the bucket" if scheme(url) == "gs" else
            f"{url}: no credentials for the store ({said}); set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    return PermissionError(f"{url}: access denied ({said}): the credentials in use may not do "
                           "this; grant their account a role on the bucket (e.g. "
                           "roles/storage.objectUser) or use other credentials")


class _DropRefusals(logging.Filter):
    """gcsfs logs a refused request with its traceback, then raises it: the error that reaches
    the user (one line, from :func:`_refused`) says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.exc_info[1] is not None
                    and _refusal(record.exc_info[1]))


logging.getLogger("gcsfs").addFilter(_DropRefusals())


@contextlib.contextmanager
def _access(url: str) -> Iterator[None]:
    """A refusal of the caller by the store (no credentials, no permission) as one line."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - gcsfs raises its own HttpError
        kind = _refusal(err)
        if kind is None:
            raise
        raise _refused(url, err, kind) from None


def _accessing(fn):
    """:func:`_access` around ``fn``, whose first argument is the path it reads or writes."""
    import functools

    @functools.wraps(fn)
    def wrapper(path, *args, **kwargs):
        if not is_url(path):
            return fn(path, *args, **kwargs)
        with _access(os.fspath(path)):
            return fn(path, *args, **kwargs)

    return wrapper


def _fs(path: str):
    """The fsspec filesystem of a URL and the path in its terms, with its listing cache dropped
    (other writers, tensorstore among them, change the store behind its back)."""
    import fsspec

    fs, inner = fsspec.core.url_to_fs(path)
    # Every instance of the filesystem class: etils.epath (and so orbax) holds its own.
    for instance in list(getattr(type(fs), "_cache", {}).values()) + [fs]:
        instance.invalidate_cache()
    return fs, inner


@_accessing
def _info(url: str) -> Optional[dict]:
    """The store's entry for ``url`` ("type": "file" or "directory"); None when nothing is
    there. Only that is None: fsspec's own exists / isfile / isdir answer False to any error,
    a refused caller's included, which would read as a missing file. A URL ending in a slash
    names a directory, as a local path does: an object there is None (the client drops the
    slash and finds the object ``x`` for ``x/``)."""
    fs, inner = _fs(url)
    try:
        info = fs.info(inner)
    except FileNotFoundError:
        return None
    if os.fspath(url).endswith("/") and info.get("type") != "directory":
        return None
    return info


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    return _info(path) is not None


def isfile(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    return (_info(path) or {}).get("type") == "file"


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    return (_info(path) or {}).get("type") == "directory"


def makedirs(path: str) -> None:
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


@_accessing
def listdir(path: str) -> List[str]:
    """Names of the entries directly under ``path`` (sorted); [] when there is none, and for a
    file (an object), on disk as in a bucket. A URL in a bucket that does not exist is a
    FileNotFoundError naming it (not an empty directory)."""
    if not is_url(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, inner = _fs(path)
    try:
        entries = fs.ls(inner, detail=True)
    except FileNotFoundError:
        if scheme(path) in SCHEMES and _no_bucket(path):
            raise _not_found(path) from None
        return []
    # Entries that name ``path`` itself are not under it: the client lists an object as itself
    # (an object is not a directory), and a folder made in a console is an empty object
    # ``name/``, listed in it.
    here = inner.rstrip("/")
    return sorted(basename(e["name"]) for e in entries if e["name"].rstrip("/") != here)


@_accessing
def remove_tree(path: str) -> bool:
    """Deletes a directory and everything under it; False (and nothing done) when there is
    none."""
    if not is_url(path):
        if not os.path.isdir(path):
            return False
        shutil.rmtree(path)
        return True
    fs, inner = _fs(path)
    if not exists(path):
        return False
    fs.rm(inner, recursive=True)
    return True


@_accessing
def remove(path: str) -> None:
    """Deletes one file (object); none there is no error."""
    if not is_url(path):
        if os.path.exists(path):
            os.remove(path)
        return
    fs, inner = _fs(path)
    if exists(path):
        fs.rm_file(inner)
    _fs(path)  # no client keeps listing the old name


@_accessing
def glob(pattern: str) -> List[str]:
    """The matches of ``pattern``, sorted; ``**`` matches any depth, on disk as in a bucket."""
    if not is_url(pattern):
        return sorted(_glob.glob(pattern, recursive=True))
    fs, inner = _fs(pattern)
    try:
        found = fs.glob(inner)
    except FileNotFoundError:  # gcsfs names only its request path (b/<bucket>/o)
        raise _not_found(pattern) from None
    return sorted(f"{scheme(pattern)}://{p}" for p in found)


def _no_bucket(url: str) -> bool:
    """Whether the store says that the bucket of ``url`` does not exist (False when not known)."""
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    fs, inner = _fs(f"{scheme(url)}://{bucket}")
    try:
        fs.info(inner)
    except FileNotFoundError:
        return True
    except Exception:  # noqa: BLE001 - not known
        pass
    return False


def _not_found(url: str) -> FileNotFoundError:
    """The error for a URL that a read found nothing at, naming it and what is missing: the
    bucket, or the object (the client's own error names only its request path)."""
    if _no_bucket(url):
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        return FileNotFoundError(f"{url}: no bucket {bucket!r} (or no access to it)")
    return FileNotFoundError(f"{url}: no such object")


@_accessing
def open_file(path: str, mode: str = "r") -> IO:
    """``open`` for both kinds; text modes are UTF-8."""
    if not is_url(path):
        if "b" in mode:
            return open(path, mode)
        return open(path, mode, encoding="utf-8")
    if "a" in mode:
        raise ValueError(f"{path}: objects cannot be appended to; use storage.AppendText")
    fs, inner = _fs(path)
    try:
        return fs.open(inner, mode) if "b" in mode else fs.open(inner, mode, encoding="utf-8")
    except FileNotFoundError:
        if "r" not in mode:
            raise
        raise _not_found(path) from None


def read_text(path: str) -> str:
    with open_file(path, "r") as f:
        return f.read()


@contextlib.contextmanager
def _writing(url: str) -> Iterator[None]:
    """Names the bucket when a write to ``url`` finds none: gcsfs says only the upload URL. A
    refusal of the caller is one line too (:func:`_access`)."""
    try:
        with _access(url):
            yield
    except FileNotFoundError as err:
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        raise FileNotFoundError(f"{url}: cannot be written: no bucket {bucket!r} (or no access "
                                f"to it) ({' '.join(str(err).split())})") from None


def _tmp_host() -> str:
    import socket

    return "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "host"


# A writer's temporary file: <path>.tmp.<host>.<pid>.<random>, its own even when several
# processes (or hosts sharing a file system) write one path at once.
_TMP_NAME = re.compile(r"\.tmp\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}")
# The fixed names earlier releases wrote through (<path>.tmp, <path>.tmp<host index>).
_OLD_TMP_NAME = re.compile(r"\.tmp\d*")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, another user's
        return True
    return True


def _remove_stale_temporaries(path: str) -> None:
    """Deletes the temporary files of ``path`` that killed writers left: those of a process of
    this host that has ended, and the fixed names of earlier releases. Another live writer's (or
    another host's) are left alone."""
    host = _tmp_host()
    for name in _glob.glob(_glob.escape(path) + ".tmp*"):
        tail = name[len(path):]
        mine = _TMP_NAME.fullmatch(tail)
        if (_OLD_TMP_NAME.fullmatch(tail)
                or (mine and mine["host"] == host and not _pid_alive(int(mine["pid"])))):
            with contextlib.suppress(OSError):
                os.remove(name)


def write_text_atomic(path: str, text: str) -> None:
    """``path`` holds ``text`` whole, or what it held before: through a temporary file of this
    writer's own (``path.tmp.<host>.<pid>.<random>``: writers that run at once each write theirs,
    and the last rename wins whole) and a rename on disk; in one object write (atomic by itself)
    on an object store. Temporary files of ``path`` that killed writers left are deleted."""
    if is_url(path):
        _put_object(path, text.encode("utf-8"))
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _replace_through_temporary(path, lambda f: f.write(text.encode("utf-8")))


def _put_object(url: str, data: bytes) -> None:
    """Writes one object in one call: the store makes it visible only once all of ``data`` is
    there. (A file object opened for writing commits what it has when it is closed, so a write
    stopped part-way would leave a prefix that reads as the whole object.)"""
    with _writing(url):
        fs, inner = _fs(url)
        fs.pipe_file(inner, data)


def _replace_through_temporary(path: str, write) -> None:
    """``write(f)`` into a temporary file of this writer's own, then renamed to the local
    ``path``; a write that fails or is stopped leaves ``path`` as it was."""
    tmp = f"{path}.tmp.{_tmp_host()}.{os.getpid()}.{os.urandom(4).hex()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _remove_stale_temporaries(path)


# The file in a local directory that :func:`hold_dir` locks; it names its holder.
LOCK_FILE = ".cloud_jax.lock"


@contextlib.contextmanager
def hold_dir(path: str, what: str) -> Iterator[None]:
    """Holds the local directory ``path`` (made if missing) for this process, so that a second
    process that would write there at the same time is refused: a ConfigError naming the holder's
    pid and host. An advisory ``flock`` of ``path/LOCK_FILE``: it ends with the process, however
    that ends, so the file a dead holder leaves never blocks. Several hosts see one another's
    locks only where their shared file system carries ``flock`` (NFS does; a gcsfuse mount keeps
    each host's locks to itself). URLs are not held (an object store has no lock): a no-op."""
    if is_url(path):
        yield
        return
    import fcntl
    import socket

    path = path or os.curdir  # an empty run path is the working directory, as storage.join has it
    os.makedirs(path, exist_ok=True)
    lock_path = os.path.join(path, LOCK_FILE)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 1024).decode("utf-8", "replace").strip() or "another process"
            raise ConfigError(f"{what} {path} is in use by {holder} ({lock_path}): two runs "
                              f"writing there would mix their files; wait until it ends, stop "
                              f"it, or give this run another {what}") from None
        except OSError as err:  # a file system without flock: go on, unprotected
            log.warning("%s: cannot lock %s (%s); nothing stops a second run from writing "
                        "there at the same time", what, lock_path, err)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # and with it the lock


# How often a process waiting for another's lock (wait_for_lock) tries again, and says it waits.
LOCK_POLL_S = 0.5
LOCK_LOG_EVERY_S = 600.0


@contextlib.contextmanager
def wait_for_lock(lock_path: str, what: str, *, poll_s: float = LOCK_POLL_S,
                  log_every_s: float = LOCK_LOG_EVERY_S) -> Iterator[bool]:
    """Holds an advisory ``flock`` of the local file ``lock_path`` (made, with its directory, if
    missing) while the block runs; where another process holds it, waits until it is released,
    with a warning naming ``what`` and the holder's pid and host (again every ``log_every_s``).
    Unlike :func:`hold_dir`, which refuses a second process, the second one waits and then does
    its own check (the first one's result is there by then). The kernel releases the lock when
    its process ends, however it ends, so a killed holder's file never blocks; a holder that is
    alive and stuck is waited for. Polled rather than a blocking call, so a signal handler that
    only sets a flag still gets a waiting process to its next check. Yields whether the lock is
    held: False on a file system without ``flock`` (a warning; the block runs unprotected).
    Processes on several hosts see one another's locks only where their shared file system
    carries ``flock`` (NFS does; a gcsfuse mount keeps each host's to itself)."""
    import fcntl
    import socket

    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = last_log = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                now = time.monotonic()
                if start is None or now - last_log >= log_every_s:
                    holder = (os.pread(fd, 1024, 0).decode("utf-8", "replace").strip()
                              or "another process")
                    waited = "" if start is None else f" (for {(now - start) / 60:.0f} min)"
                    log.warning("waiting for another job building %s: %s holds %s%s; this one "
                                "goes on once that one ends", what, holder, lock_path, waited)
                    start = start if start is not None else now
                    last_log = now
                time.sleep(poll_s)
                continue
            except OSError as err:  # a file system without flock: go on, unprotected
                log.warning("cannot lock %s (%s); nothing stops another job from building %s "
                            "at the same time", lock_path, err, what)
                held = False
            else:
                held = True
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
                if start is not None:
                    log.info("done waiting for %s after %.0f s", lock_path,
                             time.monotonic() - start)
            break
        yield held
    finally:
        os.close(fd)  # and with it the lock


@_accessing
def rename(src: str, dst: str) -> None:
    """Moves a file or directory (on an object store: every object, copied then deleted)."""
    if not is_url(src):
        os.rename(src, dst)
        return
    fs, inner = _fs(src)
    target = _fs(dst)[1]
    names = fs.find(inner) or [inner]
    # Object by object, every copy before any delete (fsspec's recursive move ignores copy errors
    # and would delete what it failed to copy).
    through_host = False
    for name in names:
        dest = target + name[len(inner):]
        if not through_host:
            try:
                fs.cp_file(name, dest)
                continue
            except Exception as err:  # noqa: BLE001 - gcsfs raises its own HttpError
                # The store refused its server-side copy (fake-gcs-server rejects the empty JSON
                # body of gcsfs's rewrite call; Cloud Storage takes it): copy through this host.
                log.warning("%s: server-side copy refused (%s); copying through this host",
                            src, err)
                through_host = True
        fs.pipe_file(dest, fs.cat_file(name))
    fs.rm(names)
    _fs(src)  # no client keeps listing the old names


@_accessing
def _remote_files(url: str) -> dict:
    """{relative name: (size, etag or mtime)} of every object under ``url``."""
    fs, inner = _fs(url)
    out = {}
    try:
        found = fs.find(inner, detail=True)
    except FileNotFoundError:  # gcsfs names only its request path (b/<bucket>/o)
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        raise FileNotFoundError(f"{url}: no bucket {bucket!r} (or no access to it)") from None
    for name, info in found.items():
        rel = name[len(inner):].lstrip("/")
        if rel:
            # gcsfs names the etag "etag", s3fs "ETag" (and its time "LastModified").
            out[rel] = [info.get("size"), info.get("etag") or info.get("ETag")
                        or info.get("md5Hash") or str(info.get("mtime") or info.get("updated")
                                                      or info.get("LastModified"))]
    return out


def fingerprint(url: str) -> str:
    """A hash of the objects under ``url`` (names, sizes, etags): changes when any of them does."""
    return _version(_remote_files(url))


def _version(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def cache_root() -> str:
    """Where remote directories are staged: $CLOUD_JAX_CACHE, else ~/.cache/cloud_jax/remote."""
    return os.environ.get("CLOUD_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "cloud_jax", "remote")


@_accessing
def local_copy(url: str) -> str:
    """A local directory holding what ``url`` holds (a URL directory is downloaded into the
    cache; a local path is returned as it is). Each version of the directory (its objects' names,
    sizes and etags) has its own cache entry: an unchanged directory is not downloaded again, a
    changed one is, and older versions are then removed (one where another process is still
    downloading, when that is over). Processes that download the same version at once each
    download it; the first complete copy is kept.

    A download fills a staging directory beside its destination,
    ``.download-<host>.<pid>.<random>``, renamed into place when complete. A download that fails
    or is stopped (an error, Ctrl-C, SIGTERM) removes its own; one killed outright (kill -9, a
    lost machine) leaves it, and each use of the cache entry removes those whose process is
    over: of this host, their pid ended, and not locked (the download holds an ``flock`` of its
    staging directory while it runs; the lock ends with the process, however it ends, and
    guards a download in another pid namespace on this machine). Another host's are left alone
    (its pids mean nothing here), and so is an earlier release's ``.download-<random>`` until
    nothing in it has changed for a day."""
    if not is_url(url):
        return url
    url = url.rstrip("/")
    files = _remote_files(url)
    if not files:
        raise FileNotFoundError(f"{url}: no such directory (no object under it)")
    parent = os.path.join(cache_root(), hashlib.sha256(url.encode()).hexdigest()[:16])
    version = _version(files)
    target = os.path.join(parent, version, basename(url))
    if not os.path.isdir(target):
        _download(url, files, target)
    else:
        _remove_stale_downloads(os.path.dirname(target))
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if (name != version and not name.startswith(_DOWNLOAD_PREFIX)
                and not _remove_stale_downloads(path)):
            shutil.rmtree(path, ignore_errors=True)
    return target


@_accessing
def download_dir(url: str, dest: str) -> None:
    """Downloads every object under ``url`` into the local directory ``dest`` (which appears
    whole, or not at all; if another process made it first, its copy is kept). Staging
    directories beside ``dest``: as :func:`local_copy`."""
    files = _remote_files(url.rstrip("/"))
    if not files:
        raise FileNotFoundError(f"{url}: no such directory (no object under it)")
    _download(url.rstrip("/"), files, dest)


_DOWNLOAD_PREFIX = ".download-"
# A download's staging directory: .download-<host>.<pid>.<random> (tempfile's 8 characters).
_DOWNLOAD_NAME = re.compile(r"\.download-(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[a-z0-9_]{8}")
# Earlier releases': .download-<random>, with no owner to ask; removed once a day unchanged.
_OLD_DOWNLOAD_NAME = re.compile(r"\.download-[a-z0-9_]{8}")
_OLD_DOWNLOAD_AGE_S = 24 * 3600


def _lock_held(path: str) -> bool:
    """Whether a process holds the ``flock`` of the directory ``path`` (a running download's)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # gone, or not ours to read: nothing to remove
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a file system without flock: the pid alone says
        return False
    finally:
        os.close(fd)  # and with it the lock just taken
    return False


def _unchanged_for(path: str, seconds: float) -> bool:
    """Whether nothing under ``path`` (itself included) was modified in the last ``seconds``."""
    cutoff = time.time() - seconds
    try:
        if os.stat(path).st_mtime > cutoff:
            return False
        for root, dirs, names in os.walk(path):
            for name in dirs + names:
                if os.lstat(os.path.join(root, name)).st_mtime > cutoff:
                    return False
    except OSError:
        return False
    return True


def _download_over(path: str) -> bool:
    """Whether the staging directory ``path`` belongs to no running download (see local_copy)."""
    name = os.path.basename(path)
    mine = _DOWNLOAD_NAME.fullmatch(name)
    if mine:
        return (mine["host"] == _tmp_host() and not _pid_alive(int(mine["pid"]))
                and not _lock_held(path))
    return bool(_OLD_DOWNLOAD_NAME.fullmatch(name)) and _unchanged_for(path, _OLD_DOWNLOAD_AGE_S)


def _remove_stale_downloads(directory: str) -> bool:
    """Removes the staging directories in ``directory`` whose download is over; True when a
    running one (or one not known to be over) is left there."""
    try:
        names = os.listdir(directory)
    except OSError:
        return False
    running = False
    for name in names:
        if not name.startswith(_DOWNLOAD_PREFIX):
            continue
        path = os.path.join(directory, name)
        if _download_over(path):
            log.info("removing %s, left by a download that did not finish", path)
            shutil.rmtree(path, ignore_errors=True)
        else:
            running = True
    return running


def _download(url: str, files: dict, dest: str) -> None:
    import fcntl

    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    _remove_stale_downloads(parent)
    staging = tempfile.mkdtemp(dir=parent,
                               prefix=f"{_DOWNLOAD_PREFIX}{_tmp_host()}.{os.getpid()}.")
    fd = os.open(staging, os.O_RDONLY)
    try:
        # Held while this process runs: the sweep of another process leaves the directory alone.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        size = sum(int(info[0] or 0) for info in files.values())
        log.info("downloading %s (%d files, %.2f GB) to %s", url, len(files), size / 1e9, dest)
        fs, inner = _fs(url)
        for rel in files:
            local = os.path.join(staging, rel)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fs.get_file(f"{inner}/{rel}", local)
        try:
            os.rename(staging, dest)
        except OSError:
            if not os.path.isdir(dest):
                raise
            # another process finished the same copy first: its copy is kept, this one removed
    finally:
        os.close(fd)
        # What a failed or stopped download fetched (Ctrl-C, SIGTERM, an error); gone after the
        # rename.
        shutil.rmtree(staging, ignore_errors=True)


def upload_dir(local_dir: str, url: str, last: Sequence[str] = ()) -> None:
    """Copies every file under ``local_dir`` to ``url`` (same relative names); those named in
    ``last`` (relative names) after all the others."""
    fs, inner = _fs(url)
    files = []
    for root, _, names in os.walk(local_dir):
        for name in sorted(names):
            src = os.path.join(root, name)
            files.append((os.path.relpath(src, local_dir).replace(os.sep, "/"), src))
    for rel, src in sorted(files, key=lambda f: f[0] in last):
        with _writing(url):
            fs.put_file(src, f"{inner}/{rel}")


@contextlib.contextmanager
def staged_output(path: str, last: Sequence[str] = ()) -> Iterator[str]:
    """A local directory to write ``path``'s files into: ``path`` itself when it is local; for a
    URL a temporary directory, uploaded to it when the block ends without an error (the files
    named in ``last`` after all the others, as :func:`upload_dir`)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
        yield path
        return
    local = tempfile.mkdtemp(prefix="cloud_jax-upload-")
    try:
        yield local
        log.info("uploading to %s", path)
        upload_dir(local, path, last=last)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def copy_file(src: str, dst: str) -> None:
    """Copies one file (object). ``dst`` holds the whole of ``src``, or what it held before when
    the copy fails or is stopped part-way: an object is written in one call once ``src`` is
    read (into memory), a local file through a temporary file and a rename."""
    with open_file(src, "rb") as r:
        if is_url(dst):
            data = r.read()
        else:
            _replace_through_temporary(dst, lambda w: shutil.copyfileobj(r, w))
            return
    _put_object(dst, data)


class AppendText:
    """A text file written a line at a time.

    On disk it is opened for appending, line-buffered. On an object store it cannot be: the text
    so far (with what the object held when opened) is kept and the whole object rewritten at each
    :meth:`flush`, so a reader sees every line written before the last flush. Unless
    ``buffered``, each write flushes; a ``buffered`` writer's lines reach the object only at
    :meth:`flush` and :meth:`close` (its owner decides how often: the store allows about one write
    per second to an object, and each rewrite sends the whole text). ``fresh``: start empty
    instead of after what the file holds."""

    def __init__(self, path: str, fresh: bool = False, buffered: bool = False):
        self.path = path
        self._local: Optional[IO] = None
        self._text: List[str] = []
        self._buffered = buffered
        self._pending = False
        if is_url(path):
            if not fresh and exists(path):
                self._text.append(read_text(path))
            elif fresh:
                write_text_atomic(path, "")
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._local = open(path, "w" if fresh else "a", buffering=1, encoding="utf-8")

    def write(self, text: str) -> None:
        if self._local is not None:
            self._local.write(text)
            return
        self._text.append(text)
        self._pending = True
        if not self._buffered:
            self.flush()

    def flush(self) -> None:
        """Writes what was written since the last flush to the file (the object)."""
        if self._local is not None:
            self._local.flush()
        elif self._pending:
            write_text_atomic(self.path, "".join(self._text))
            self._pending = False

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
        else:
            self.flush()


class StagedDir:
    """A local directory whose files are uploaded to ``url`` by :meth:`sync` (for libraries that
    write only local files: TensorBoard's event writer). On a local ``url`` it is that directory
    and :meth:`sync` does nothing."""

    def __init__(self, url: str):
        self.url = url
        if is_url(url):
            self.local = tempfile.mkdtemp(prefix="cloud_jax-staged-")
        else:
            os.makedirs(url, exist_ok=True)
            self.local = url

    def sync(self) -> None:
        if is_url(self.url):
            upload_dir(self.local, self.url)

    def close(self) -> None:
        self.sync()
        if is_url(self.url):
            shutil.rmtree(self.local, ignore_errors=True)
