"""The released models on demand (star_jax/pretrained.py), end to end against an HTTP server on
127.0.0.1 (a thread of the test) that plays Google Drive with the tiny official checkpoint: the
confirmation page (its form, or its cookie), a connection cut half way, corrupt and foreign files, no
server at all, a mirror (URL and folder), the sha256 recorded at the first download and checked after,
and the converted checkpoint run by FaceLandmarker and predict."""

import dataclasses
import hashlib
import html
import http.server
import importlib.util
import io
import json
import os
import pickle
import shutil
import socket
import threading
import urllib.parse
import zipfile

import numpy as np
import pytest

from conftest import DATA, OFFICIAL_TINY_FLAGS, REPO, TINY_CONFIG, tiny_wflw_config
from star_jax import layouts
from star_jax import pretrained
from star_jax import predict
from star_jax.inference import landmarker as landmarker_lib

PKL = DATA / 'tiny_wflw_checkpoint.pkl'
PHOTO = DATA / 'real_faces_full' / 'takeo.png'
BOX = (31.0, 66.0, 135.0, 169.0)
# The tiny official WFLW network as a release: 98 points, configs/wflw.py:tiny with 4 stacks of 32 channels.
TINY = pretrained.Release('tiny', 'WFLW', 'tiny-file-id', tiny_wflw_config(), 'WFLW', 98)


class _State:
  """What the fake Drive serves and what it was asked."""

  def __init__(self):
    self.files = {'drive': PKL.read_bytes(), 'tiny.pkl': PKL.read_bytes()}
    self.mode = 'form'        # the confirmation step: 'form' (drive.usercontent.google.com), 'cookie', 'none'
    self.cut = 0              # cut this many file answers half way
    self.log = []             # (path, query dict, Range header)


def _handler(state):
  class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
      pass

    def _page(self, body: str, cookie: str | None = None):
      data = body.encode()
      self.send_response(200)
      self.send_header('Content-Type', 'text/html; charset=utf-8')
      if cookie:
        self.send_header('Set-Cookie', cookie)
      self.send_header('Content-Length', str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def _file(self, data: bytes):
      start = 0
      ranged = self.headers.get('Range')
      if ranged:
        start = int(ranged.split('=')[1].split('-')[0])
      body = data[start:]
      self.send_response(206 if ranged else 200)
      self.send_header('Content-Type', 'application/octet-stream')
      self.send_header('Content-Length', str(len(body)))
      if ranged:
        self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
      self.end_headers()
      if state.cut:
        state.cut -= 1
        self.wfile.write(body[:len(body) // 2])
        self.wfile.flush()
        self.close_connection = True
        return
      self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's name)
      url = urllib.parse.urlsplit(self.path)
      query = dict(urllib.parse.parse_qsl(url.query))
      state.log.append((url.path, query, self.headers.get('Range')))
      if url.path == '/download':
        if state.mode == 'form' and (query.get('confirm'), query.get('uuid')) != ('t', 'u-42'):
          return self._page(
              '<html><head><title>Google Drive - Virus scan warning</title></head><body>'
              '<p>Google Drive can\'t scan this file for viruses.</p>'
              '<form id="download-form" action="/download" method="get">'
              f'<input type="submit" value="Download anyway"><input type="hidden" name="id" value="{query.get("id")}">'
              '<input type="hidden" name="export" value="download"><input type="hidden" name="confirm" value="t">'
              '<input type="hidden" name="uuid" value="u-42"></form></body></html>')
        if state.mode == 'cookie' and query.get('confirm') != 'Xy_9':
          return self._page('<html><head><title>Virus scan warning</title></head><body>too large to scan'
                            '</body></html>', cookie='download_warning_13058876669334088843_x=Xy_9; Path=/')
        if state.mode == 'quota':
          return self._page('<html><head><title>Google Drive - Quota exceeded</title></head><body></body></html>')
        return self._file(state.files['drive'])
      name = url.path.rsplit('/', 1)[-1]
      if url.path.startswith('/mirror/') and name in state.files:
        return self._file(state.files[name])
      self.send_error(404)

  return Handler


@pytest.fixture
def server():
  state = _State()
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _handler(state))
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  state.url = f'http://127.0.0.1:{httpd.server_address[1]}'
  try:
    yield state
  finally:
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _no_mirror(monkeypatch):
  monkeypatch.delenv(pretrained.MIRROR_ENV, raising=False)


def _fetch(server, home, release=TINY, **kwargs):
  return pretrained.fetch(release, home=home, drive_url=server.url + '/download', progress=False, **kwargs)


def _listing(folder):
  """Every file under `folder` with its size and modification time (what 'untouched' means)."""
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(folder.rglob('*')) if p.is_file() and not p.name.endswith('.lock')}


def test_the_registry_names_the_official_releases():
  assert list(pretrained.RELEASES) == ['wflw', '300w', 'cofw']
  readme = (REPO.parent / 'official' / 'README.md')
  for release in pretrained.RELEASES.values():
    config = release.load_config()
    assert config.layout == release.layout and config.data.image_size == 256
    assert layouts.get_layout(config.layout).num_points == release.num_points
    if readme.is_file():   # the official checkout, where there is one
      assert release.page_url in readme.read_text()
  assert pretrained.get('WFLW').published['ocular'] == {'nme': 4.02, 'fr': 2.32, 'auc': 0.605}
  assert pretrained.get('cofw').published['pupil']['nme'] == 4.62
  with pytest.raises(ValueError, match='no released model called'):
    pretrained.get('dlib')


def test_first_download_through_the_confirmation_form_then_the_cache_and_its_sha256(server, tmp_path):
  home = tmp_path / 'home'
  directory = _fetch(server, home)
  folder = home / 'pretrained'
  assert directory == folder / 'tiny' and (directory / '0').is_dir()
  assert (folder / 'tiny.pkl').read_bytes() == PKL.read_bytes() and not (folder / 'tiny.pkl.part').exists()
  assert (folder / 'tiny.pkl.sha256').read_text().strip() == hashlib.sha256(PKL.read_bytes()).hexdigest()
  # The page first, then the form's confirmed request.
  assert [(path, query.get('id'), query.get('confirm')) for path, query, _ in server.log] == [
      ('/download', 'tiny-file-id', None), ('/download', 'tiny-file-id', 't')]
  # Second use: from the cache, no request.
  assert _fetch(server, home) == directory and len(server.log) == 2
  # The file changed in the cache: refused, named, and nothing deleted.
  data = bytearray(PKL.read_bytes())
  data[len(data) // 2] ^= 0xFF
  (folder / 'tiny.pkl').write_bytes(bytes(data))
  before = _listing(folder)
  with pytest.raises(pretrained.ReleaseFileError, match=r'tiny\.pkl: its sha256 [0-9a-f]{64} is not the one '
                     r'recorded when it was downloaded .* delete it to download it again'):
    _fetch(server, home)
  assert _listing(folder) == before


def test_the_cookie_confirmation_and_a_page_without_one(server, tmp_path):
  server.mode = 'cookie'
  assert (_fetch(server, tmp_path / 'a') / '0').is_dir()
  assert [query.get('confirm') for _, query, _ in server.log] == [None, 'Xy_9']
  server.mode = 'quota'
  with pytest.raises(pretrained.DownloadError, match=r'answered a web page \("Google Drive - Quota exceeded"\) '
                     r'instead of the file.*save it as .*tiny\.pkl'):
    _fetch(server, tmp_path / 'b')
  assert [p.name for p in (tmp_path / 'b' / 'pretrained').iterdir()] == ['tiny.lock']


def test_a_cut_connection_is_resumed_with_a_range_request(server, tmp_path):
  server.cut = 1
  size = len(PKL.read_bytes())
  home = tmp_path / 'home'
  _fetch(server, home)
  files = [(query.get('confirm'), ranged) for path, query, ranged in server.log if query.get('confirm')]
  # The first answer stopped at half the file; the next asked for the rest.
  assert files == [('t', None), ('t', f'bytes={size // 2}-')]
  assert (home / 'pretrained' / 'tiny.pkl').read_bytes() == PKL.read_bytes()
  # A download interrupted in an earlier process is resumed from its .part file.
  home2 = tmp_path / 'home2'
  (home2 / 'pretrained').mkdir(parents=True)
  (home2 / 'pretrained' / 'tiny.pkl.part').write_bytes(PKL.read_bytes()[:1000])
  server.log.clear()
  _fetch(server, home2)
  assert [ranged for _, _, ranged in server.log] == ['bytes=1000-', 'bytes=1000-']   # page, then the file
  assert (home2 / 'pretrained' / 'tiny.pkl').read_bytes() == PKL.read_bytes()


def _unsafe_pickle() -> bytes:
  """A torch.save-like archive whose pickle calls os.system."""
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as z:
    z.writestr('archive/data.pkl', pickle.dumps(os.system, protocol=2))
  return buffer.getvalue()


@pytest.mark.parametrize('kind, message', [
    ('truncated', 'damaged or truncated zip archive'),
    # Read by torch.load(weights_only=True) where PyTorch is installed, refused either way.
    ('garbage', '(not a PyTorch checkpoint|not a readable torch.save checkpoint)'),
    ('foreign', r'edge-to-point transform \(29, 7, 1, 1\)'),  # the COFW network where WFLW's is expected
    ('unsafe', 'refusing to load it'),
])
def test_corrupt_and_foreign_files_are_refused_and_the_cache_untouched(server, tmp_path, kind, message):
  home = tmp_path / 'home'
  _fetch(server, home)                                   # a model already in the cache
  before = _listing(home / 'pretrained')
  server.files['drive'] = {'truncated': PKL.read_bytes()[:len(PKL.read_bytes()) // 3],
                           'garbage': b'<not a checkpoint>' * 100,
                           'foreign': (DATA / 'tiny_cofw_checkpoint.pkl').read_bytes(),
                           'unsafe': _unsafe_pickle()}[kind]
  other = dataclasses.replace(TINY, name='other')
  with pytest.raises(pretrained.ReleaseFileError, match=r'the file fetched from .* was refused, and the cache left '
                     r'as it was: not the released WFLW model: .*' + message):
    _fetch(server, home, other)
  assert _listing(home / 'pretrained') == before
  assert not [p for p in (home / 'pretrained').iterdir() if p.name.startswith(('other', '.other'))
              and not p.name.endswith('.lock')]


def test_no_server_is_one_error_naming_what_was_tried_the_cache_and_the_manual_steps(tmp_path):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]                            # nothing listens there once closed
  home = tmp_path / 'home'
  with pytest.raises(pretrained.DownloadError) as caught:
    pretrained.fetch(TINY, home=home, drive_url=f'http://127.0.0.1:{port}/download', progress=False)
  message = str(caught.value)
  assert '\n' not in message
  for part in (f'tried http://127.0.0.1:{port}/download?id=tiny-file-id&export=download', 'Connection refused',
               f'The cache is {home / "pretrained"}', 'https://drive.google.com/file/d/tiny-file-id/view',
               f'save it as {home / "pretrained" / "tiny.pkl"}', 'STAR_JAX_MIRROR'):
    assert part in message, (part, message)
  assert not [p for p in (home / 'pretrained').iterdir() if not p.name.endswith('.lock')]


def test_the_mirror_as_url_and_as_folder(server, tmp_path, monkeypatch):
  monkeypatch.setenv(pretrained.MIRROR_ENV, server.url + '/mirror/')
  home = tmp_path / 'a'
  _fetch(server, home)
  assert [path for path, _, _ in server.log] == ['/mirror/tiny.pkl']
  folder = tmp_path / 'mirror'
  folder.mkdir()
  shutil.copy(PKL, folder / 'tiny.pkl')
  server.log.clear()
  directory = _fetch(server, tmp_path / 'b', mirror=str(folder))
  assert (directory / '0').is_dir() and server.log == []
  assert pretrained._source(TINY, 'file://' + str(folder), '') == str(folder / 'tiny.pkl')  # pylint: disable=protected-access
  with pytest.raises(pretrained.DownloadError, match=r'no such file in the mirror folder.*tiny\.pkl'):
    _fetch(server, tmp_path / 'c', mirror=str(tmp_path / 'empty'))


def test_the_converted_release_runs_as_the_official_pkl_does(tmp_path, monkeypatch, capsys):
  folder = tmp_path / 'mirror'
  folder.mkdir()
  shutil.copy(PKL, folder / 'tiny.pkl')
  monkeypatch.setenv('STAR_JAX_HOME', str(tmp_path / 'home'))
  monkeypatch.setenv(pretrained.MIRROR_ENV, str(folder))
  from_release = landmarker_lib.FaceLandmarker.from_pretrained(TINY, detector=None)
  assert from_release.checkpoint == str(tmp_path / 'home' / 'pretrained' / 'tiny')
  assert (from_release.weights, from_release.layout) == ('model', 'WFLW')
  from_pkl = landmarker_lib.FaceLandmarker.from_checkpoint(PKL, config=tiny_wflw_config(), detector=None,
                                                           refine=False)
  a, b = from_release(PHOTO, BOX, refine=False)[0], from_pkl(PHOTO, BOX)[0]
  np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-4)
  np.testing.assert_allclose(a.covariances, b.covariances, rtol=1e-3, atol=1e-4)

  # predict --pretrained: the registry's 'wflw' pointed at the tiny model, served by the mirror folder.
  monkeypatch.setitem(pretrained.RELEASES, 'wflw', dataclasses.replace(TINY, name='wflw'))
  shutil.copy(PKL, folder / 'wflw.pkl')
  out = tmp_path / 'out'
  assert predict.main(['predict', '--pretrained', 'wflw', str(PHOTO), '--output', str(out), '--box',
                       ','.join(map(str, BOX)), '--norefine']) == 0
  record = json.loads((out / 'takeo.json').read_text())
  assert record['checkpoint'] == str(tmp_path / 'home' / 'pretrained' / 'wflw')
  np.testing.assert_allclose(record['faces'][0]['landmarks'], b.landmarks, atol=2e-3)
  # Offline (an unreachable mirror): the one-line error, exit status 1.
  monkeypatch.setenv(pretrained.MIRROR_ENV, 'http://127.0.0.1:9/mirror')
  monkeypatch.setitem(pretrained.RELEASES, 'wflw', dataclasses.replace(TINY, name='wflw2'))
  assert predict.main(['predict', '--pretrained', 'wflw', str(PHOTO), '--output', str(tmp_path / 'o2')]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: cannot fetch the released WFLW model: tried '
                                             'http://127.0.0.1:9/mirror/wflw2.pkl: ')
  assert not (tmp_path / 'o2').exists()


def _load_script(name):
  spec = importlib.util.spec_from_file_location(name, REPO / 'scripts' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_command_that_takes_a_checkpoint_takes_pretrained(tmp_path, monkeypatch, capsys, tiny_tfds_dir):
  # The registry's 'wflw' pointed at the tiny official model, served by a mirror folder.
  folder = tmp_path / 'mirror'
  folder.mkdir()
  shutil.copy(PKL, folder / 'wflw.pkl')
  monkeypatch.setenv('STAR_JAX_HOME', str(tmp_path / 'home'))
  monkeypatch.setenv(pretrained.MIRROR_ENV, str(folder))
  monkeypatch.setitem(pretrained.RELEASES, 'wflw', dataclasses.replace(TINY, name='wflw'))
  released = "the released WFLW model: the official file's net, what the official tester ran"
  tiny = [f'--config={REPO / "configs" / "wflw.py"}:tiny', *OFFICIAL_TINY_FLAGS]

  # evaluate: the converted release scores what the official .pkl's net scores, and the report says so.
  from star_jax import evaluate
  common = [f'--config.data.data_dir={tiny_tfds_dir}', '--noprogress', '--config.data.max_eval_examples=4']
  assert evaluate.main(['evaluate', TINY_CONFIG, '--pretrained', 'wflw', '--output', str(tmp_path / 'e1'),
                        *common]) == 0
  assert evaluate.main(['evaluate', TINY_CONFIG, '--pytorch', str(PKL), *OFFICIAL_TINY_FLAGS,
                        '--output', str(tmp_path / 'e2'), *common]) == 0
  first, second = (json.loads((tmp_path / e / 'metrics.json').read_text()) for e in ('e1', 'e2'))
  assert (first['info']['pretrained'], first['info']['chosen_by'], first['info']['best_by_protocol']) == (
      'wflw', released, True)
  assert first['info']['checkpoint'] == str(tmp_path / 'home' / 'pretrained' / 'wflw')
  assert first['rows'][0]['nme'] == pytest.approx(second['rows'][0]['nme'], rel=1e-5)
  assert released in (tmp_path / 'e1' / 'report.md').read_text()
  capsys.readouterr()
  assert evaluate.main(['evaluate', TINY_CONFIG, '--pretrained', 'wflw', '--step', 'latest', *common]) == 2
  assert '--step: not with --pretrained' in capsys.readouterr().err

  # export: the release's net, printed with the reason.
  from star_jax import export
  out = tmp_path / 'wflw.stablehlo'
  assert export.main(['export', '--pretrained', 'wflw', '--output', str(out), '--format', 'stablehlo',
                      '--platforms', 'cpu']) == 0
  assert f'step 0, model weights ({released})' in capsys.readouterr().out
  crops = np.stack([np.full((64, 64, 3), v, np.uint8) for v in (60, 160)])
  landmarks = np.asarray(export.load_stablehlo(out)(crops.astype(np.float32))[0])
  from_pkl = landmarker_lib.FaceLandmarker.from_checkpoint(PKL, config=tiny_wflw_config(), detector=None)
  np.testing.assert_allclose(landmarks, export.to_crop_pixels(from_pkl.network(crops)['landmarks'], 0.0, 64)[0],
                             atol=1e-3)
  assert export.main(['export', '--pretrained', 'wflw', '--checkpoint', str(tmp_path), '--output', str(out)]) == 2
  assert 'give one of --pretrained, --checkpoint (not --pretrained and --checkpoint)' in capsys.readouterr().err

  # The demo: its page and every answer say what runs.
  pytest.importorskip('flask', reason="the demo extra (pip install -e '.[demo]') is not installed")
  from werkzeug import serving
  from star_jax import demo
  served = {}

  class _Stopped:
    server_port = 1

    def __init__(self, app):
      served['app'] = app

    def serve_forever(self):
      raise KeyboardInterrupt

    def server_close(self):
      pass

  monkeypatch.setattr(serving, 'make_server', lambda host, port, app, threaded: _Stopped(app))
  assert demo.main(['demo', '--pretrained', 'wflw']) == 0
  assert released in capsys.readouterr().out
  client = served['app'].test_client()
  assert html.escape(released) in client.get('/').get_data(as_text=True)
  record = client.post('/predict', data={'image': (open(PHOTO, 'rb'), 'takeo.png')}).get_json()
  assert (record['pretrained'], record['chosen_by'], record['weights'], len(record['faces'])) == (
      'wflw', released, 'model', 1)
  assert demo.main(['demo', '--pretrained', 'wflw', '--config', 'wflw']) == 2

  # scripts/reproduce.py: the dataset defaults to the release's.
  from star_jax_datasets.wflw import fake_data
  fake_data.write(tmp_path / 'raw', num_train=2, num_test=3)
  reproduce = _load_script('reproduce')
  assert reproduce.main(['reproduce.py', '--pretrained', 'wflw', '--manual_dir', str(tmp_path / 'raw'), '--data_dir',
                         str(tmp_path / 'tfds'), *tiny, '--output', str(tmp_path / 'r')]) == 3   # random weights
  doc = json.loads((tmp_path / 'r' / 'reproduce.json').read_text())
  assert (doc['pretrained'], doc['chosen_by'], doc['num_images']) == ('wflw', released, 3)
  assert reproduce.main(['reproduce.py', '--pretrained', 'wflw', '--dataset', 'cofw', *tiny]) == 2
