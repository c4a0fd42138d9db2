"""The local web demo (star_jax.demo): its app through Flask's test client, and the real command in a
headless Chromium (Debian's chromium and chromium-driver, driven by Selenium), uploading a real photo.

The browser test skips, saying why, when Flask, Selenium, Chromium or its driver is missing (.ci/run
installs them). STAR_JAX_DEMO_SCREENSHOT=path.png also saves the browser's screenshot there."""

import base64
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
                             '--port', '0'], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
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
  finally:
    if driver is not None:
      driver.quit()
    server.terminate()
    try:
      server.wait(timeout=20)
    except subprocess.TimeoutExpired:
      server.kill()
    time.sleep(0)
