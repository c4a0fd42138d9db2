"""The released official STAR models, fetched on first use: downloaded, checked, converted once, cached.

  python -m star_jax.predict --pretrained wflw photo.jpg --output out
  landmarker = star_jax.FaceLandmarker.from_pretrained('wflw')
  directory = star_jax.pretrained.fetch('wflw')     # the converted star_jax checkpoint directory

The registry (`RELEASES`): 'wflw' (98 points), '300w' (68) and 'cofw' (29), each the official
release's file on Google Drive (the ids on the official README, github.com/ZhenglinZhou/STAR), the
config it is converted with (configs/<name>.py), its layout and the published figures it scored
(`Release.published`, from star_jax.evaluation.report.PUBLISHED).

The cache, `<home>/pretrained` with <home> = $STAR_JAX_HOME or ~/.cache/star_jax (star_jax/home.py):
  <name>.pkl          the official file, as downloaded (kept for the checksum and a re-conversion)
  <name>.pkl.sha256   its sha256, recorded at the first download; every later use checks the file
                      against it, and a new download must match it
  <name>/             the converted checkpoint: the file's `net` (what the official tester ran for the
                      published figures) as the 'model' weights, read by load_model like any other
  <name>.pkl.part     a download under way or interrupted; the next attempt resumes it (HTTP Range)
  <name>.lock         held while a process fetches <name> (another one waits)

A download streams into the .part file with a progress bar, resumes after a cut connection (up to
`ATTEMPTS` tries, each continuing where the last stopped), and is checked before anything enters the
cache: the file is read by the restricted unpickler of star_jax/convert_pytorch.py (a pickle asking
for anything but tensors is refused unexecuted) and converted into the model of the release's config
(a file of another layout or network does not fit). Only then are the file, its sha256 and the
converted checkpoint moved into place, each by an atomic rename; a file that fails the checks is
deleted and the cache is left as it was. Google Drive answers large files with a page asking to
confirm the download (no virus scan); its form (drive.usercontent.google.com), confirm link or
`download_warning` cookie is followed. Concurrent fetches of one model wait for each other (a lock
file) where the platform has file locks.

$STAR_JAX_MIRROR, a base URL or a folder, serves `<mirror>/<name>.pkl` instead of Google Drive (for
sites behind a firewall, or a copy made once). Without a connection, `fetch` raises one
`DownloadError` naming what was tried, the cache folder and the steps to install the file by hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import html.parser
import http.cookiejar
import os
import pathlib
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from absl import flags
import tqdm

from star_jax import cli
from star_jax import config_lib
from star_jax import files
from star_jax import home as home_lib

try:
  import fcntl
except ImportError:  # not POSIX: concurrent fetches are not serialised
  fcntl = None

MIRROR_ENV = 'STAR_JAX_MIRROR'
DRIVE_DOWNLOAD = 'https://drive.usercontent.google.com/download'
OFFICIAL_REPOSITORY = 'https://github.com/ZhenglinZhou/STAR'
# Tries per download; each continues where the previous one stopped (a try that gets no byte at all
# ends the download: the source is unreachable, not flaky).
ATTEMPTS = 5
TIMEOUT_S = 60.0
_CHUNK = 1 << 20
_USER_AGENT = 'star_jax (python urllib)'


class DownloadError(OSError):
  """A released model that could not be fetched (offline, refused, interrupted too often)."""


class ReleaseFileError(ValueError):
  """A fetched file that is not the released model (not a checkpoint, unsafe, another network, or
  not the bytes recorded at the first download)."""


@dataclasses.dataclass(frozen=True)
class Release:
  """One released model.

  name: the registry key ('wflw') and the file's name in the cache and on a mirror (<name>.pkl).
  dataset: the dataset it was trained on, as the published tables name it ('WFLW').
  drive_id: the Google Drive file id of the official release.
  config: the config it is converted with: a config file spec ('configs/wflw.py[:arg]', resolved as
    `--config` is) or an ml_collections ConfigDict.
  layout, num_points: its landmark layout.
  sha256: the file's known digest, checked at download; None: recorded at the first download.
  """
  name: str
  dataset: str
  drive_id: str
  config: Any
  layout: str
  num_points: int
  sha256: str | None = None

  @property
  def page_url(self) -> str:
    """The file's page on Google Drive (where a browser downloads it)."""
    return f'https://drive.google.com/file/d/{self.drive_id}/view'

  @property
  def published(self) -> dict:
    """The published figures of the official model (paper units: NME and FR in %, AUC a fraction),
    by normalisation ('ocular' / 'pupil'), as star_jax.evaluation.report.PUBLISHED holds them."""
    from star_jax.evaluation import report  # lazy: JAX-free ONNX path (the report module imports TFDS)
    return report.PUBLISHED.get(self.dataset, {})

  def load_config(self):
    """The config the file is converted with, as a ConfigDict (a copy)."""
    if isinstance(self.config, str):
      return config_lib.load_config(self.config)
    return self.config.copy_and_resolve_references()


RELEASES = {
    'wflw': Release('wflw', 'WFLW', '1aOx0wYEZUfBndYy_8IYszLPG_D2fhxrT', 'configs/wflw.py', 'WFLW', 98),
    '300w': Release('300w', '300W', '1NFcZ9jzql_jnn3ulaSzUlyhS05HWB9n_', 'configs/300w.py', '300W', 68),
    'cofw': Release('cofw', 'COFW', '1Fiu3hjjkQRdKsWE9IgyNPdiJSz9_MzA5', 'configs/cofw.py', 'COFW', 29),
}


def get(name) -> Release:
  """The release called `name` (any case), or `name` itself when it is a Release; ValueError otherwise."""
  if isinstance(name, Release):
    return name
  release = RELEASES.get(str(name).lower())
  if release is None:
    raise ValueError(f'no released model called {name!r}; choose one of {", ".join(RELEASES)}')
  return release


def cache_dir(home: os.PathLike | str | None = None) -> pathlib.Path:
  """The folder of the released models: <home>/pretrained (home: by default star_jax.home.home())."""
  return pathlib.Path(home if home is not None else home_lib.home()) / 'pretrained'


def sha256_of(path: os.PathLike | str) -> str:
  """The hex sha256 of a file."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(_CHUNK), b''):
      digest.update(block)
  return digest.hexdigest()


# ---- Google Drive's confirmation page -----------------------------------------------------------

class _Forms(html.parser.HTMLParser):
  """The forms of a page: [(action, {input name: value})], and its title."""

  def __init__(self):
    super().__init__()
    self.forms: list[tuple[str, dict]] = []
    self.title = ''
    self._in_title = False

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == 'form':
      self.forms.append((attrs.get('action') or '', {}))
    elif tag == 'input' and self.forms and attrs.get('name'):
      self.forms[-1][1][attrs['name']] = attrs.get('value') or ''
    self._in_title = tag == 'title'

  def handle_endtag(self, tag):
    self._in_title = False

  def handle_data(self, data):
    if self._in_title:
      self.title += data


def _with_query(url: str, **params) -> str:
  parts = urllib.parse.urlsplit(url)
  query = dict(urllib.parse.parse_qsl(parts.query))
  query.update(params)
  return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def confirmed_url(url: str, page: str, cookies: http.cookiejar.CookieJar) -> str | None:
  """The URL that confirms a download from Google Drive's 'cannot scan this file for viruses' page:
  its download form (action and hidden inputs, drive.usercontent.google.com), else the token of a
  `confirm=` link or of a `download_warning` cookie added to `url`; None when the page offers none
  (a quota or sign-in page)."""
  forms = _Forms()
  forms.feed(page)
  for action, inputs in forms.forms:
    if 'confirm' in inputs or 'id' in inputs:
      return urllib.parse.urljoin(url, action or url).split('?')[0] + '?' + urllib.parse.urlencode(inputs)
  match = re.search(r'confirm=([0-9A-Za-z_-]+)', html.unescape(page))
  if match:
    return _with_query(url, confirm=match.group(1))
  for cookie in cookies:
    if cookie.name.startswith('download_warning'):
      return _with_query(url, confirm=cookie.value)
  return None


def _page_title(page: str) -> str:
  forms = _Forms()
  forms.feed(page)
  return ' '.join(forms.title.split())[:120] or 'no title'


# ---- Downloading --------------------------------------------------------------------------------

def _open_file(opener, url: str, start: int):
  """The response carrying the file from byte `start` (a Range request when start > 0), through
  Google Drive's confirmation page when one comes instead."""
  first = url
  for _ in range(3):
    headers = {'User-Agent': _USER_AGENT}
    if start:
      headers['Range'] = f'bytes={start}-'
    response = opener.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    if 'text/html' not in (response.headers.get('Content-Type') or '').lower():
      return response
    with response:
      page = response.read(1 << 20).decode('utf-8', 'replace')
    following = confirmed_url(url, page, opener.cookies)
    if following is None or following == url:
      raise DownloadError(f'{first}: the server answered a web page ("{_page_title(page)}") instead of the file '
                          '(a download quota, a sign-in or a removed file?)')
    url = following
  raise DownloadError(f'{first}: the server kept answering confirmation pages instead of the file')


def _total_size(response, start: int) -> int | None:
  """The whole file's size from a response's Content-Range (206) or Content-Length (200)."""
  if response.status == 206:
    match = re.match(r'bytes (\d+)-\d+/(\d+|\*)', response.headers.get('Content-Range') or '')
    if not match or int(match.group(1)) != start:
      return -1  # not the range asked for
    return int(match.group(2)) if match.group(2) != '*' else None
  length = response.headers.get('Content-Length')
  return int(length) if length and length.isdigit() else None


def _progress_bar(total, initial, desc, progress):
  return tqdm.tqdm(total=total, initial=initial, unit='B', unit_scale=True, unit_divisor=1024, desc=desc,
                   file=sys.stderr, disable=None if progress is None else not progress, leave=False)


def download(url: str, part: pathlib.Path, *, progress: bool | None = None, desc: str = 'download') -> None:
  """Downloads `url` into `part`, continuing what `part` already holds (HTTP Range; from the start
  when the server ignores the range). Tries up to ATTEMPTS times while each try makes progress.
  Raises DownloadError naming the URL and the last error."""
  class Opener:  # urllib's opener with its cookie jar at hand (Google Drive's confirmation cookie)
    def __init__(self):
      self.cookies = http.cookiejar.CookieJar()
      self._opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))

    def open(self, request, timeout):
      return self._opener.open(request, timeout=timeout)

  opener = Opener()
  error = None
  for _ in range(ATTEMPTS):
    have = part.stat().st_size if part.exists() else 0
    got = 0
    try:
      try:
        response = _open_file(opener, url, have)
      except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the range starts at or past the end: start over
          part.unlink()
          error = e
          continue
        raise
      with response:
        total = _total_size(response, have)
        if total == -1:
          raise DownloadError(f'{url}: the server answered another range than bytes={have}- '
                              f'({response.headers.get("Content-Range")})')
        if response.status == 200:
          have = 0  # the whole file (a server that ignores ranges): start over
        with open(part, 'ab' if have else 'wb') as f, _progress_bar(total, have, desc, progress) as bar:
          while True:
            block = response.read(_CHUNK)
            if not block:
              break
            f.write(block)
            got += len(block)
            bar.update(len(block))
      size = part.stat().st_size
      if total is None or size == total:
        return
      error = f'the connection closed at {size} of {total} bytes'
    except DownloadError:
      raise
    except (urllib.error.URLError, OSError, ValueError) as e:  # ValueError: http.client's malformed answers
      error = e
    if not got:
      break
  raise DownloadError(f'{url}: {_describe(error)}')


def _describe(error) -> str:
  if isinstance(error, urllib.error.HTTPError):
    return str(error)
  if isinstance(error, urllib.error.URLError):
    error = error.reason
  if isinstance(error, OSError) and error.errno is not None:
    return str(error)  # '[Errno 111] Connection refused'
  return f'{type(error).__name__}: {error}' if isinstance(error, BaseException) else str(error)


def _copy(source: pathlib.Path, part: pathlib.Path, progress: bool | None, desc: str) -> None:
  """A mirror folder's file into `part`."""
  if not source.is_file():
    raise DownloadError(f'{source}: no such file in the mirror folder')
  try:
    with open(source, 'rb') as src, open(part, 'wb') as dst, \
        _progress_bar(source.stat().st_size, 0, desc, progress) as bar:
      for block in iter(lambda: src.read(_CHUNK), b''):
        dst.write(block)
        bar.update(len(block))
  except OSError as e:
    raise DownloadError(f'{source}: {_describe(e)}') from None


# ---- The cache ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(path: pathlib.Path):
  """An exclusive lock on `path` (created) for the block; nothing where the platform has no fcntl."""
  if fcntl is None:
    yield
    return
  with open(path, 'a+b') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _convert(pkl: pathlib.Path, release: Release, target: pathlib.Path) -> None:
  """Converts the release file `pkl` (its `net`) into the star_jax checkpoint `target`, built in a
  temporary folder beside it and renamed into place; ReleaseFileError when the file does not read
  as a checkpoint or does not fit the release's model."""
  from star_jax import convert_pytorch  # lazy: JAX-free ONNX path (converting needs JAX)

  config = release.load_config()
  building = pathlib.Path(tempfile.mkdtemp(prefix=f'.{release.name}.converting-', dir=target.parent))
  try:
    try:
      convert_pytorch.convert_checkpoint(str(pkl), config, str(building / 'checkpoint'), weights='net')
    except (ValueError, KeyError) as e:  # CheckpointFormatError, UnsafeCheckpointError are ValueErrors
      raise ReleaseFileError(f'not the released {release.dataset} model: {e}') from None
    if target.exists():
      shutil.rmtree(target)
    os.replace(building / 'checkpoint', target)
  finally:
    shutil.rmtree(building, ignore_errors=True)


def _manual_steps(release: Release, folder: pathlib.Path) -> str:
  return (f'to install it by hand, download {release.page_url} with a browser (or the Baidu link on '
          f'{OFFICIAL_REPOSITORY}), save it as {folder / (release.name + ".pkl")} and run again; or set '
          f'{MIRROR_ENV} to a URL or folder that serves {release.name}.pkl')


def _source(release: Release, mirror: str | None, drive_url: str) -> str:
  if mirror:
    if re.match(r'^[a-z][a-z0-9+.-]*://', mirror, re.IGNORECASE) and not mirror.lower().startswith('file://'):
      return mirror.rstrip('/') + f'/{release.name}.pkl'
    folder = urllib.parse.urlsplit(mirror).path if mirror.lower().startswith('file://') else mirror
    return str(pathlib.Path(folder).expanduser() / f'{release.name}.pkl')
  return f'{drive_url}?{urllib.parse.urlencode({"id": release.drive_id, "export": "download"})}'


def fetch(name, *, home: os.PathLike | str | None = None, mirror: str | None = None,
          progress: bool | None = None, drive_url: str = DRIVE_DOWNLOAD) -> pathlib.Path:
  """The converted checkpoint directory of a released model, fetched and converted on first use.

  name: 'wflw', '300w', 'cofw' (`RELEASES`), or a `Release`.
  home: the cache's home folder (default $STAR_JAX_HOME or ~/.cache/star_jax).
  mirror: a base URL or folder serving <name>.pkl instead of Google Drive (default $STAR_JAX_MIRROR).
  progress: show the download's progress bar and a line per step (default: when stderr is a terminal).
  drive_url: Google Drive's download endpoint (the file id is its `id` parameter).
  Raises DownloadError (an OSError) when the file cannot be fetched, ReleaseFileError (a ValueError)
  when the file fetched, or the one in the cache, is not the released model or not the recorded bytes.
  """
  release = get(name)
  folder = cache_dir(home)
  pkl, record = folder / f'{release.name}.pkl', folder / f'{release.name}.pkl.sha256'
  part, converted = folder / f'{release.name}.pkl.part', folder / release.name
  mirror = os.environ.get(MIRROR_ENV) if mirror is None else mirror
  say = (lambda message: print(message, file=sys.stderr)) if (
      progress or (progress is None and sys.stderr.isatty())) else (lambda message: None)
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DownloadError(f'cannot create the cache folder {folder} ({e.strerror or e}); set '
                        f'{home_lib.HOME_ENV} to a writable folder') from None
  with _locked(folder / f'{release.name}.lock'):
    recorded = record.read_text().strip() if record.is_file() else None
    if pkl.is_file():
      digest = sha256_of(pkl)
      if recorded is not None and digest != recorded:
        raise ReleaseFileError(
            f'{pkl}: its sha256 {digest} is not the one recorded when it was downloaded ({recorded}, in {record}): '
            f'the file has changed since; delete it to download it again')
      if not (converted / '0').is_dir() or recorded is None:
        say(f'converting {pkl} ({release.dataset}, its net weights) into {converted}')
        try:
          _convert(pkl, release, converted)
        except ReleaseFileError as e:
          raise ReleaseFileError(f'{pkl}: {e}; delete it to download it again') from None
        if recorded is None:
          files.atomic_write_text(record, digest + '\n')
      return converted
    if (converted / '0').is_dir():
      return converted  # the official file was deleted to save space; the conversion stands

    source = _source(release, mirror, drive_url)
    say(f'downloading the released {release.dataset} model from {source} into {folder}')
    try:
      if '://' in source:
        download(source, part, progress=progress, desc=f'{release.name}.pkl')
      else:
        _copy(pathlib.Path(source), part, progress, f'{release.name}.pkl')
    except DownloadError as e:
      raise DownloadError(f'cannot fetch the released {release.dataset} model: tried {e}. The cache is {folder} '
                          f'(${home_lib.HOME_ENV} moves it); {_manual_steps(release, folder)}') from None
    try:
      digest = sha256_of(part)
      expected = release.sha256 or recorded
      if expected is not None and digest != expected:
        raise ReleaseFileError(
            f'its sha256 {digest} is not the expected {expected}'
            + (f' (recorded at the first download, in {record}; if the release has changed, delete that '
               'file to accept the new one)' if release.sha256 is None else ''))
      say(f'converting {release.name}.pkl ({release.dataset}, its net weights) into {converted}')
      _convert(part, release, converted)
    except ReleaseFileError as e:
      part.unlink(missing_ok=True)
      raise ReleaseFileError(f'the file fetched from {source} was refused, and the cache left as it was: {e}') from None
    files.atomic_write_text(record, digest + '\n')
    os.replace(part, pkl)
  return converted


# ---- Command-line flag --------------------------------------------------------------------------

def define_flag(fv) -> None:
  """Defines --pretrained on a command's FlagValues `fv` (see `flag_checkpoint`)."""
  flags.DEFINE_enum('pretrained', None, list(RELEASES), 'a released official model, downloaded into the cache '
                    f'(${home_lib.HOME_ENV}, default ~/.cache/star_jax) on first use and converted once '
                    f'(${MIRROR_ENV}: a URL or folder serving <name>.pkl instead)', flag_values=fv)


def check_flags(fv, *, sources: tuple[str, ...] = ('checkpoint',), checkpoint_only: tuple[str, ...] = ()) -> None:
  """Usage errors (absl flags.Error) of --pretrained: it excludes the other weight `sources` (one of
  them all must be given), and the `checkpoint_only` flags that choose within a checkpoint."""
  given = [name for name in ('pretrained',) + tuple(sources) if fv[name].value is not None]
  names = ', '.join(f'--{name}' for name in ('pretrained',) + tuple(sources))
  if len(given) != 1:
    raise flags.Error(f'give one of {names}' + (f' (not {" and ".join("--" + g for g in given)})' if given else ''))
  if fv.pretrained is not None:
    used = [f'--{name}' for name in checkpoint_only if fv[name].present]
    if used:
      raise flags.Error(f'{", ".join(used)}: not with --pretrained (a released model is one network: the '
                        "official file's net, converted with its dataset's config)")


def chosen_by(name) -> str:
  """How a released model's weights were chosen, in words, for the records of what ran."""
  return f"the released {get(name).dataset} model: the official file's net, what the official tester ran"


def flag_checkpoint(fv) -> str | None:
  """The converted checkpoint directory of --pretrained (fetched on first use, with a progress bar on
  a terminal), or None when the flag is not given; a cli.UserError when it cannot be fetched."""
  if fv.pretrained is None:
    return None
  try:
    return str(fetch(fv.pretrained))
  except (DownloadError, ReleaseFileError) as e:
    raise cli.UserError(str(e)) from None
