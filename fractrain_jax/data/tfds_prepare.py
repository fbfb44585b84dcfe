"""A TFDS dataset's builder, its data prepared: downloaded where TFDS can, refused where not.

``prepared_builder(name, data_dir, download)``:

- prepared under ``data_dir`` already (or inside ``tfds.testing.mock_data``):
  the builder as it is;
- a dataset TFDS cannot download (``MANUAL_DOWNLOAD_INSTRUCTIONS``:
  ImageNet) whose files are not in TFDS's manual folder: one line saying which
  files go where, whatever ``download`` says;
- ``download`` off: one line saying where it looked and what to do instead;
- ``download`` on (the config's default): the download hosts are probed first
  (``unreachable``, seconds), so that offline the run stops in one line naming
  ``folder:`` and ``data.data_dir`` rather than after minutes of urllib3
  retries; then TFDS downloads, with its progress bars, and prepares it once.
"""

from __future__ import annotations

import logging
import pathlib
import socket
import threading
import urllib.parse
from typing import Any

from fractrain_jax.data.common import _tfds
from fractrain_jax.errors import DataError

log = logging.getLogger(__name__)

# How long a download host may take to accept a connection (its name resolved too).
PROBE_TIMEOUT_S = 20.0

_ELSE = ("point --config.data.data_dir=... at a prepared copy, or train on an image folder "
         "with --config.data.dataset=folder:PATH (PATH/train/<class>/, PATH/test/<class>/)")


def _tfds_is_mocked(tfds: Any) -> bool:
  """True inside `tfds.testing.mock_data`, which serves random examples.

  mock_data replaces `DatasetBuilder.as_dataset` with its own function; the
  builder then reads nothing from disk, so "not prepared" means nothing.
  """
  as_dataset = tfds.core.DatasetBuilder.as_dataset
  return getattr(as_dataset, "__module__", "") == "tensorflow_datasets.testing.mocking"


def download_urls(builder: Any) -> list[str]:
  """The files TFDS downloads for ``builder`` (from its registered checksums)."""
  return sorted(builder.url_infos or {})


def unreachable(urls: list[str], timeout: float = PROBE_TIMEOUT_S) -> str | None:
  """Why the first host of ``urls`` that cannot be reached is not ("www.x.org:443: Name or
  service not known"); None when every host accepts a connection within ``timeout``."""
  for host, port in sorted({_host_port(url) for url in urls}):
    outcome: list[BaseException | None] = []

    def connect(host=host, port=port, outcome=outcome):
      try:
        socket.create_connection((host, port), timeout=timeout).close()
        outcome.append(None)
      except OSError as err:
        outcome.append(err)

    # A thread, since a name lookup does not honour the socket's timeout.
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    if not outcome:
      return f"{host}:{port}: no answer within {timeout:g} s"
    if outcome[0] is not None:
      err = outcome[0]
      return f"{host}:{port}: {getattr(err, 'strerror', None) or err}"
  return None


def _host_port(url: str) -> tuple[str, int]:
  parts = urllib.parse.urlsplit(url)
  return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def _manual_files_present(builder: Any) -> bool:
  """TFDS's manual folder (``<data_dir>/downloads/manual``) holds something."""
  manual = pathlib.Path(builder.data_dir_root) / "downloads" / "manual"
  return manual.is_dir() and any(manual.iterdir())


def prepared_builder(name: str, data_dir: str | None, download: bool) -> Any:
  """The tfds builder of `name`, its data prepared; DataError (one line) when it cannot be."""
  tfds = _tfds()
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared() or _tfds_is_mocked(tfds):
    return builder
  where = data_dir if data_dir is not None else f"{builder.data_dir_root} (the tfds default)"
  missing = f"dataset {name!r} is not prepared in data_dir={where} (looked for {builder.data_dir})"
  instructions = builder.MANUAL_DOWNLOAD_INSTRUCTIONS
  if instructions and not _manual_files_present(builder):
    manual = pathlib.Path(builder.data_dir_root) / "downloads" / "manual"
    raise DataError(f"{missing} and TFDS cannot download it: {' '.join(instructions.split())} "
                    f"Put them in {manual} and run again to prepare it, or {_ELSE}.")
  if not download:
    # Refuse here: letting tfds try would start minutes of download retries offline.
    raise DataError(f"{missing} and download is off. Let tfds download and prepare it with "
                    f"--config.data.download=True, or {_ELSE}.")
  if not instructions:
    urls = download_urls(builder)
    why = unreachable(urls)
    if why is not None:
      raise DataError(f"{missing} and cannot be downloaded ({why}): offline, {_ELSE}.")
    size = sum(int(info.size) for info in builder.url_infos.values())
    log.info("Downloading %s (%.0f MB) and preparing it in %s; once", name, size / 1e6,
             builder.data_dir)
  builder.download_and_prepare()
  return builder
