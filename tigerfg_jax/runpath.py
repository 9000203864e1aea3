"""Run folders (a workdir, its teacher/, an export) as local paths or gs:// URLs.

Every read and write of a run folder goes through `etils.epath.Path`, which serves
local paths with `os` and gs:// with fsspec's `gcsfs` (or TensorFlow's gfile where
TensorFlow is installed); Orbax writes the checkpoint arrays of a gs:// folder with
TensorStore's own GCS driver. gs:// is the one URL scheme: Orbax's array writer knows
no other. Dataset folders (`data.root`) and the ArrayRecord cache stay local.

A URL folder is checked once, before any work (`check_writable`): where this machine
cannot write there, one line says why (`RunFolderAccessError`, an OSError, so the CLIs
print it as a user error) and nothing is written anywhere.
"""

from __future__ import annotations

import os
import uuid

from etils import epath

URL_SCHEMES = ("gs",)
_ACCESS_HELP = {
    "gs": "install gcsfs (pip install gcsfs) and authenticate "
          "(gcloud auth application-default login), or use a local or mounted folder",
}


class RunFolderAccessError(OSError):
  """A URL run folder this machine cannot use (no backend, no credentials, no bucket)."""


def scheme(folder: str | None) -> str | None:
  """'gs' for 'gs://bucket/run'; None for a local path (or None)."""
  return folder.split("://", 1)[0] if folder and "://" in folder else None


def is_url(folder: str | None) -> bool:
  return scheme(folder) is not None


def path(folder: str, *parts: str) -> epath.Path:
  """`folder/parts...` as an epath.Path (a local path stays as given, relative or not)."""
  return epath.Path(folder).joinpath(*parts)


def absolute(folder: str, *parts: str) -> epath.Path:
  """`path(folder, *parts)`, made absolute when local (Orbax asks for absolute paths)."""
  if is_url(folder):
    return path(folder, *parts)
  return epath.Path(os.path.abspath(os.path.join(folder, *parts)))


def _one_line(error: BaseException) -> str:
  text = " ".join(str(error).split()) or type(error).__name__
  return f"{type(error).__name__}: {text}"


def access_error(folder: str, what: str, error: BaseException) -> RunFolderAccessError:
  """The one-line error for a URL folder that failed: which, what failed, what to do."""
  advice = _ACCESS_HELP.get(scheme(folder) or "", "use a local or mounted folder")
  return RunFolderAccessError(f"{what}={folder}: cannot use this location from this "
                              f"machine ({_one_line(error)}); {advice}")


def check_scheme(folder: str, what: str) -> None:
  """Raises RunFolderAccessError for a URL whose scheme run folders do not support."""
  if is_url(folder) and scheme(folder) not in URL_SCHEMES:
    raise RunFolderAccessError(
        f"{what}={folder}: run folders are local paths or "
        f"{' or '.join(s + '://' for s in URL_SCHEMES)} URLs (another bucket works "
        "mounted, e.g. --workdir=/mnt/bucket/run)")


def check_writable(folder: str, what: str = "--workdir") -> None:
  """For a URL `folder`: creates it and writes and deletes a probe file there.

  Raises:
    RunFolderAccessError: the scheme is not supported, or the backend, the
      credentials or the bucket is missing (the exception's cause in one line).
  """
  if not is_url(folder):
    return
  check_scheme(folder, what)
  try:
    probe = path(folder, f".tigerfg_probe-{uuid.uuid4().hex}")
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("probe")
    probe.unlink()
  except Exception as error:  # ImportError (no gcsfs), auth, HTTP errors: all one line.
    raise access_error(folder, what, error) from error


def exists(folder: str, *parts: str, what: str = "--workdir") -> bool:
  """Whether `folder/parts` exists; a URL this machine cannot reach is one-line error."""
  check_scheme(folder, what)
  try:
    return path(folder, *parts).exists()
  except Exception as error:  # no backend or credentials for a URL.
    if not is_url(folder):
      raise
    raise access_error(folder, what, error) from error


def append_lines(file: epath.Path, lines: list[str]) -> None:
  """Appends `lines` (each ending in a newline) to `file`. Object stores have no
  append: a URL file is rewritten whole (run logs are small)."""
  if not is_url(os.fspath(file)):
    with open(file, "a") as f:
      f.writelines(lines)
    return
  before = file.read_text() if file.exists() else ""
  file.write_text(before + "".join(lines))
