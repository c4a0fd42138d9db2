"""The local web demo (star_jax.demo): its app through Flask's test client, and the real command in a
headless Chromium (Debian's chromium and chromium-driver, driven by Selenium), uploading a real photo.

The browser test skips, saying why, when Flask, Selenium, Chromium or its driver is missing (.ci/run
installs them). STAR_JAX_DEMO_SCREENSHOT=path.png also saves the browser's screenshot there."""

import base64
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from conftest import COMPILE_CACHE_ENV, DATA, REPO
from star_jax.inference import face_detect

PHOTO = DATA / 'real_faces_full' / 'breakingbad.jpg'
CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'
CHROMEDRIVER = shutil.which('chromedriver') or '/usr/bin/chromedriver'


def test_demo_app_answers_an_upload(tiny_landmarker):
  pytest.importorskip('flask', reason="the demo extra (pip install -e '.[demo]') is not installed")
  from star_jax import demo

  landmarker = tiny_landmarker
  client = demo.make_app(landmarker, info='tiny').test_client()
  page = client.get('/').get_data(as_text=True)
  assert '<input type="file"' in page and 'Download JSON' in page and 'http' not in page.split('<script>')[1]
  answer = client.post('/predict', data={'image': (open(PHOTO, 'rb'), 'bb.jpg'), 'faces': 'all', 'ambiguity': '1'})
  assert answer.status_code == 200
  record = answer.get_json()
  assert (record['width'], record['height'], record['num_points']) == (1920, 1080, 98)
  assert len(record['faces']) == 2 and np.array(record['faces'][0]['covariances']).shape == (98, 2, 2)
  picture = base64.b64decode(record['picture'].split(',', 1)[1])
  assert cv2.imdecode(np.frombuffer(picture, np.uint8), cv2.IMREAD_COLOR).shape == (1080, 1920, 3)
  answer = client.post('/predict', data={'image': (open(PHOTO, 'rb'), 'bb.jpg'), 'faces': 'largest'})
  landmarker.faces = 'all'
  assert len(answer.get_json()['faces']) == 1 and 'covariances' in answer.get_json()['faces'][0]
  bad = client.post('/predict', data={'image': (__import__('io').BytesIO(b'not an image'), 'x.jpg')})
  assert bad.status_code == 400 and 'not an image' in bad.get_json()['error']
  assert client.post('/predict', data={}).status_code == 400


def test_demo_command_errors(tmp_path, capsys):
  pytest.importorskip('flask', reason="the demo extra (pip install -e '.[demo]') is not installed")
  from star_jax import demo
  assert demo.main(['demo', '--checkpoint', str(tmp_path / 'missing')]) == 1
  assert 'does not exist' in capsys.readouterr().err
  assert demo.main(['demo']) == 2


class _Server:
  """The demo's app served by Werkzeug on 127.0.0.1 in a thread (requests run concurrently, as in the
  real command); `post` uploads a file as the page does."""

  def __init__(self, app):
    import threading
    from werkzeug import serving
    self.server = serving.make_server('127.0.0.1', 0, app, threaded=True)
    self.url = f'http://127.0.0.1:{self.server.server_port}'
    threading.Thread(target=self.server.serve_forever, daemon=True).start()

  def post(self, data: bytes, filename='photo.jpg', timeout=120):
    import urllib.error
    import urllib.request
    boundary = 'starjaxboundary'
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="faces"\r\n\r\nall\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            'Content-Type: application/octet-stream\r\n\r\n').encode() + data + f'\r\n--{boundary}--\r\n'.encode()
    request = urllib.request.Request(self.url + '/predict', data=body, method='POST',
                                     headers={'Content-Type': f'multipart/form-data; boundary={boundary}'})
    try:
      with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as e:
      return e.code, e.headers, json.loads(e.read())

  def close(self):
    self.server.shutdown()
    self.server.server_close()


def test_demo_refuses_a_huge_image_at_once_while_it_serves_a_photo(tiny_landmarker, tmp_path, caplog):
  pytest.importorskip('flask', reason="the demo extra (pip install -e '.[demo]') is not installed")
  import concurrent.futures
  from bigimages import write_flat_png
  from star_jax import demo

  huge = write_flat_png(tmp_path / 'huge.png', 20000, 20000).read_bytes()        # 1.2 MB, 1.2 GB decoded
  huger = write_flat_png(tmp_path / 'huger.png', 40000, 40000).read_bytes()      # over OpenCV's limit
  server = _Server(demo.make_app(tiny_landmarker, info='tiny'))
  try:
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
      photo = pool.submit(server.post, PHOTO.read_bytes(), 'bb.jpg')
      big = [pool.submit(server.post, data, name) for data, name in ((huge, 'huge.png'), (huger, 'huger.png'))]
      for future, (name, size) in zip(big, (('huge.png', '20000 x 20000'), ('huger.png', '40000 x 40000'))):
        status, _, record = future.result(timeout=60)
        assert status == 413 and record['error'].startswith(f'{name}: {size} pixels') and 'limit of 200 million' \
            in record['error']
      status, _, record = photo.result(timeout=300)
    assert status == 200 and len(record['faces']) == 2 and record['picture_scale'] == 1.0
    assert 'huge.png: 20000 x 20000' in caplog.text                             # the server log says why
  finally:
    server.close()


class _Detector:
  def detect(self, image):
    return [face_detect.Face((10.0, 10.0, 50.0, 50.0), 0.9)]


def test_demo_busy_answers_503_and_every_error_is_json(tmp_path, caplog, monkeypatch):
  pytest.importorskip('flask', reason="the demo extra (pip install -e '.[demo]') is not installed")
  import concurrent.futures
  import threading
  from star_jax import demo
  from star_jax.inference import landmarker as landmarker_lib

  go, started = threading.Event(), threading.Semaphore(0)

  def slow(crops):
    started.release()
    assert go.wait(60)
    return {'landmarks': np.zeros((len(crops), 5, 2), np.float32)}

  landmarker = landmarker_lib.FaceLandmarker(slow, 32, detector=_Detector(), refine=False)
  ok, png = cv2.imencode('.png', np.full((60, 80, 3), 128, np.uint8))
  server = _Server(demo.make_app(landmarker, max_waiting=1))
  try:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      first = pool.submit(server.post, png.tobytes())
      assert started.acquire(timeout=60)                                        # the first is in work
      # Three more: one may wait its turn (max_waiting=1); the other two are told at once that it is busy,
      # while the first is still in work.
      others = [pool.submit(server.post, png.tobytes()) for _ in range(3)]
      early = []
      for future in concurrent.futures.as_completed(others, timeout=60):
        early.append(future.result())
        if len(early) == 2:
          break
      assert not first.done()
      go.set()
      later = [f.result(timeout=60) for f in [first] + others]
    assert [status for status, _, _ in early] == [503, 503]
    assert sorted(status for status, _, _ in later) == [200, 200, 503, 503]
    status, headers, record = early[0]
    assert record['error'].startswith('busy') and headers['Retry-After'] == '5'
  finally:
    go.set()
    server.close()

  def broken(crops):
    raise RuntimeError('the network broke')

  client = demo.make_app(landmarker_lib.FaceLandmarker(broken, 32, detector=_Detector())).test_client()
  answer = client.post('/predict', data={'image': (io.BytesIO(png.tobytes()), 'x.png')})
  assert answer.status_code == 500 and 'RuntimeError: the network broke' in answer.get_json()['error']
  assert 'Traceback' in caplog.text and 'the network broke' in caplog.text
  for method, path, code in (('get', '/nothing', 404), ('get', '/predict', 405)):
    answer = getattr(client, method)(path)
    assert answer.status_code == code and answer.is_json and str(code) in answer.get_json()['error']
  monkeypatch.setattr(demo, 'MAX_UPLOAD_BYTES', 1000)
  client = demo.make_app(landmarker).test_client()
  answer = client.post('/predict', data={'image': (io.BytesIO(bytes(5000)), 'big.jpg')})
  assert answer.status_code == 413 and 'larger than' in answer.get_json()['error']


def _browser_missing() -> str:
  for module in ('flask', 'selenium'):
    try:
      __import__(module)
    except ImportError:
      return f"Python package {module} is not installed (pip install -e '.[test]')"
  for path, package in ((CHROMIUM, 'chromium'), (CHROMEDRIVER, 'chromium-driver')):
    if not os.path.isfile(path):
      return f'{path} is missing (apt-get install {package}; .ci/run installs it)'
  return ''


@pytest.mark.skipif(bool(_browser_missing()), reason=_browser_missing() or 'runs')
def test_demo_in_a_headless_browser(tiny_wflw_checkpoint, tmp_path):
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait

  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', **COMPILE_CACHE_ENV)
  server = subprocess.Popen([sys.executable, '-m', 'star_jax.demo', '--checkpoint', str(tiny_wflw_checkpoint),
                             '--port', '0', '--faces', 'all'], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  driver = None
  try:
    line = server.stdout.readline()
    assert 'http://127.0.0.1:' in line, line + server.stdout.read()[-3000:] if server.poll() is not None else line
    url = line.split()[line.split().index('on') + 1]
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ('--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                '--disable-component-update', '--no-first-run', '--disable-dev-shm-usage', '--window-size=1200,1000'):
      options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.get(url)
    assert 'Facial landmarks' in driver.find_element(By.TAG_NAME, 'h1').text
    driver.find_element(By.ID, 'image').send_keys(str(PHOTO))
    driver.find_element(By.ID, 'run').click()
    status = driver.find_element(By.ID, 'status')
    WebDriverWait(driver, 180).until(lambda d: 'face' in status.text or 'error' in status.text)
    assert status.text.startswith('2 faces, 98 points each'), status.text
    # The picture is the photo at full size, with something drawn on it.
    WebDriverWait(driver, 30).until(lambda d: d.execute_script('return document.getElementById("result").complete'))
    assert driver.execute_script('return document.getElementById("result").naturalWidth') == 1920
    assert len(driver.find_elements(By.CSS_SELECTOR, '#faces_table tr')) == 3
    # The download link holds the JSON: read it back through the page.
    link = driver.find_element(By.ID, 'download')
    assert link.is_displayed() and link.get_attribute('href').startswith('blob:')
    text = driver.execute_async_script(
        'const done = arguments[0]; fetch(document.getElementById("download").href).then(r => r.text()).then(done);')
    record = json.loads(text)
    assert len(record['faces']) == 2 and 'picture' not in record
    assert np.array(record['faces'][0]['landmarks']).shape == (98, 2)
    shot = tmp_path / 'demo.png'
    driver.save_screenshot(str(shot))
    assert cv2.imread(str(shot)) is not None
    if os.environ.get('STAR_JAX_DEMO_SCREENSHOT'):
      shutil.copy(shot, pathlib.Path(os.environ['STAR_JAX_DEMO_SCREENSHOT']))
    # An error answer (not an image) is shown on the page, not swallowed.
    (tmp_path / 'notes.jpg').write_text('not an image')
    driver.find_element(By.ID, 'image').send_keys(str(tmp_path / 'notes.jpg'))
    driver.find_element(By.ID, 'run').click()
    WebDriverWait(driver, 60).until(lambda d: status.text.startswith('error'))
    assert 'notes.jpg: this file is not an image' in status.text, status.text
    assert status.get_attribute('class') == 'error'
  finally:
    if driver is not None:
      driver.quit()
    server.terminate()
    try:
      server.wait(timeout=20)
    except subprocess.TimeoutExpired:
      server.kill()
    time.sleep(0)
