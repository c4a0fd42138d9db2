"""docs/demo.png: the demo page (python -m star_jax.demo) in headless Chromium after uploading a photo.

  python scripts/demo_screenshot.py --checkpoint runs/synthetic --photo face.jpg [--output docs/demo.png]

Needs Flask and Selenium (pip install -e '.[demo,browser-test]') and Debian's chromium and
chromium-driver. tests/test_demo.py drives the page the same way and checks what it shows.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from star_jax import cli  # pylint: disable=wrong-import-position


def _main(argv):
  command = cli.Command(__doc__, argv)
  fv = command.fv
  flags.DEFINE_string('checkpoint', None, 'what the demo serves', flag_values=fv)
  flags.DEFINE_string('photo', None, 'photo to upload', flag_values=fv)
  flags.DEFINE_string('output', str(REPO / 'docs' / 'demo.png'), 'screenshot (PNG)', flag_values=fv)
  flags.DEFINE_string('size', '1100,900', 'browser window width,height', flag_values=fv)
  command.parse()
  command.require('checkpoint', 'photo')
  from selenium import webdriver  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.common.by import By  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=import-outside-toplevel

  server = subprocess.Popen([sys.executable, '-m', 'star_jax.demo', '--checkpoint', fv.checkpoint, '--port', '0'],
                            stdout=subprocess.PIPE, text=True)
  driver = None
  try:
    line = server.stdout.readline()
    url = line.split()[line.split().index('on') + 1]
    options = webdriver.ChromeOptions()
    options.binary_location = '/usr/bin/chromium'
    for arg in ('--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                '--disable-component-update', '--no-first-run', f'--window-size={fv.size}'):
      options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path='/usr/bin/chromedriver'))
    driver.get(url)
    driver.find_element(By.ID, 'image').send_keys(str(pathlib.Path(fv.photo).absolute()))
    driver.find_element(By.ID, 'run').click()
    status = driver.find_element(By.ID, 'status')
    WebDriverWait(driver, 300).until(lambda d: ' s' in status.text and 'working' not in status.text)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script('return document.getElementById("result").complete'))
    driver.save_screenshot(fv.output)
    print(f'{status.text}; written {fv.output}')
  finally:
    if driver is not None:
      driver.quit()
    server.terminate()
    server.wait(timeout=30)
  return 0


if __name__ == '__main__':
  sys.exit(cli.guarded(_main, None, __doc__))
