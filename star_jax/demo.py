"""A local web page: upload a photo, see its landmarks and ambiguity ellipses, download the JSON.

  python -m star_jax.demo --checkpoint DIR [--port 7860] [--faces all|largest|best] [--config NAME]

Needs the demo extra (Flask): pip install -e '.[demo]'. The page is served on 127.0.0.1 only (this
machine; nothing is reachable from the network) until Ctrl-C. --checkpoint is what predict takes: a
star_jax checkpoint directory or training workdir, or an official .pkl (converted in memory; --config
wflw|300w|cofw or a config file, by default chosen by its number of points). Faces are found by the
offline BlazeFace detector; each face's landmarks are drawn with their 1-sigma ambiguity ellipses
(the covariance STAR models), and the JSON (boxes, scores, landmarks (x, y) and covariances in image
pixels) can be downloaded.

The page is one HTML file with a few lines of JavaScript (no framework, nothing from the internet);
the server is Flask's (Werkzeug), which is enough for one user on one machine.
"""

from __future__ import annotations

import base64
import html
import json
import threading
import time

from absl import flags
import cv2
import jax
import numpy as np

from star_jax import cli
from star_jax.inference import face_detect
from star_jax.inference import landmarker as landmarker_lib

HOST = '127.0.0.1'
MAX_UPLOAD_BYTES = 32 * 1024 * 1024

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>star_jax landmarks</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body {{ font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 70rem; padding: 0 1rem; color: #222; }}
 h1 {{ font-size: 1.4rem; margin-bottom: .2rem; }} .info {{ color: #666; font-size: .9rem; margin-top: 0; }}
 form {{ display: flex; flex-wrap: wrap; gap: .8rem; align-items: center; padding: .8rem; background: #f3f4f6;
        border-radius: .5rem; }}
 button {{ padding: .4rem 1.2rem; }} #status {{ margin: .8rem 0; min-height: 1.2rem; }}
 #status.error {{ color: #b00020; }}
 #result {{ max-width: 100%; min-width: min(100%, 480px); border-radius: .3rem; }}
 table {{ border-collapse: collapse; font-size: .9rem; margin: .6rem 0; }}
 td, th {{ border: 1px solid #ddd; padding: .2rem .6rem; text-align: right; }}
</style></head>
<body>
<h1>Facial landmarks with STAR</h1>
<p class="info">{info}</p>
<form id="form">
 <input type="file" id="image" name="image" accept="image/*" required>
 <label>faces <select name="faces" id="faces">{face_options}</select></label>
 <label><input type="checkbox" name="ambiguity" id="ambiguity" value="1" checked> ambiguity ellipses</label>
 <button type="submit" id="run">Find landmarks</button>
 <a id="download" download="landmarks.json" hidden>Download JSON</a>
</form>
<div id="status"></div>
<div id="faces_table"></div>
<img id="result" alt="">
<script>
const form = document.getElementById('form'), status = document.getElementById('status');
const download = document.getElementById('download'), result = document.getElementById('result');
form.addEventListener('submit', async (event) => {{
  event.preventDefault();
  status.className = ''; status.textContent = 'working...'; download.hidden = true;
  const response = await fetch('predict', {{method: 'POST', body: new FormData(form)}});
  const data = await response.json();
  if (!response.ok) {{ status.className = 'error'; status.textContent = 'error: ' + data.error; return; }}
  result.src = data.picture;
  delete data.picture;
  const n = data.faces.length;
  status.textContent = (n ? n + (n === 1 ? ' face' : ' faces') + ', ' + data.num_points + ' points each'
      : 'no face found (try another photo)') + ', in ' + data.seconds.toFixed(2) + ' s';
  let rows = '<table><tr><th>face</th><th>detector score</th><th>box (x_min, y_min, x_max, y_max)</th>'
      + '<th>mean ambiguity (px)</th></tr>';
  data.faces.forEach((f, i) => {{
    const amb = f.covariances ? (f.covariances.map(c => Math.sqrt((c[0][0] + c[1][1]) / 2))
        .reduce((a, b) => a + b, 0) / f.covariances.length).toFixed(2) : '';
    rows += '<tr><td>' + (i + 1) + '</td><td>' + (f.detector_score ?? '') + '</td><td>'
        + f.box.map(v => v.toFixed(1)).join(', ') + '</td><td>' + amb + '</td></tr>';
  }});
  document.getElementById('faces_table').innerHTML = n ? rows + '</table>' : '';
  download.href = URL.createObjectURL(new Blob([JSON.stringify(data, null, 1)], {{type: 'application/json'}}));
  download.hidden = false;
}});
</script>
</body></html>
"""


def page(info: str, faces: str) -> str:
  """The page's HTML (one file: style, form, script)."""
  options = ''.join(f'<option value="{m}"{" selected" if m == faces else ""}>{m}</option>'
                    for m in face_detect.FACE_MODES)
  return _PAGE.format(info=html.escape(info), face_options=options)


def decode_upload(data: bytes) -> np.ndarray:
  """The uploaded file as uint8 (H, W, 3) RGB; ValueError when it is not an image OpenCV reads."""
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
  if image is None:
    raise ValueError('this file is not an image that can be read (JPEG, PNG, BMP, TIFF, WebP...)')
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def make_app(landmarker, *, faces: str = 'all', info: str = ''):
  """The Flask app of the page: GET / (the page), POST /predict (multipart 'image', 'faces',
  'ambiguity') -> JSON {width, height, num_points, layout, faces: [FaceResult.to_dict()], picture:
  JPEG data URL, seconds}, or {error} with status 400."""
  import flask  # lazy: optional extra (the 'demo' extra)

  app = flask.Flask('star_jax.demo')
  app.config['MAX_CONTENT_LENGTH'] = MAX_UPLOAD_BYTES
  # One prediction at a time: the landmarker (its detector and the compiled network) is shared.
  lock = threading.Lock()
  html_page = page(info, faces)

  @app.get('/')
  def index():
    return flask.Response(html_page, mimetype='text/html')

  @app.post('/predict')
  def run():
    upload = flask.request.files.get('image')
    if upload is None:
      return flask.jsonify(error='no image uploaded'), 400
    mode = flask.request.form.get('faces', faces)
    if mode not in face_detect.FACE_MODES:
      return flask.jsonify(error=f'faces must be one of {", ".join(face_detect.FACE_MODES)}'), 400
    ambiguity = flask.request.form.get('ambiguity') == '1'
    try:
      image = decode_upload(upload.read())
    except ValueError as e:
      return flask.jsonify(error=str(e)), 400
    start = time.perf_counter()
    with lock:
      landmarker.faces = mode
      results = landmarker(image)
    picture = landmarker.draw(image, results, show_ambiguity=ambiguity)
    ok, jpeg = cv2.imencode('.jpg', cv2.cvtColor(picture, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
      return flask.jsonify(error='cannot encode the picture'), 500
    h, w = image.shape[:2]
    record = {'image': upload.filename, 'width': w, 'height': h, **landmarker.describe(),
              'num_points': None if not results else int(results[0].landmarks.shape[0]),
              'coordinates': '0-based image pixels (x, y); covariances in pixels^2',
              'faces': [r.to_dict() for r in results], 'seconds': time.perf_counter() - start,
              'picture': 'data:image/jpeg;base64,' + base64.b64encode(jpeg.tobytes()).decode('ascii')}
    if not results:
      record['num_points'] = 0
    return flask.Response(json.dumps(record), mimetype='application/json')

  @app.errorhandler(413)
  def too_large(_):
    return flask.jsonify(error=f'the file is larger than {MAX_UPLOAD_BYTES // 2**20} MB'), 413

  return app


def _demo(argv: list[str]) -> int:
  command = cli.Command(__doc__, argv)
  fv = command.fv
  flags.DEFINE_string('checkpoint', None, 'star_jax checkpoint directory (or training workdir), or an official .pkl',
                      flag_values=fv)
  flags.DEFINE_string('config', None, 'for an official .pkl only: wflw, 300w, cofw or a config file', flag_values=fv)
  flags.DEFINE_integer('port', 7860, 'port on 127.0.0.1 (0: any free port)', lower_bound=0, upper_bound=65535,
                       flag_values=fv)
  flags.DEFINE_enum('faces', 'all', list(face_detect.FACE_MODES), 'faces per photo, by default (the page can '
                    'change it)', flag_values=fv)
  flags.DEFINE_float('min_face_size', face_detect.DEFAULT_MIN_FACE_SIZE, 'smallest face side searched for (px)',
                     lower_bound=1e-6, flag_values=fv)
  flags.DEFINE_float('min_face_score', face_detect.DEFAULT_SCORE_THRESHOLD, 'least BlazeFace score of a face',
                     lower_bound=0.0, upper_bound=1.0, flag_values=fv)
  rest = command.parse()
  if rest:
    raise flags.Error(f'unexpected arguments: {" ".join(rest)}')
  command.require('checkpoint')
  try:
    from werkzeug import serving  # lazy: optional extra (the 'demo' extra; Flask's server)
    import flask  # noqa: F401  # lazy: optional extra (the 'demo' extra; checked before loading the model)
  except ImportError:
    raise cli.UserError("the demo needs Flask: pip install -e '.[demo]' (or pip install flask)") from None
  cli.setup_logging('error')
  try:
    landmarker = landmarker_lib.FaceLandmarker.from_checkpoint(
        fv.checkpoint, config=fv.config, faces=fv.faces, min_face_size=fv.min_face_size,
        min_face_score=fv.min_face_score)
  except (FileNotFoundError, ValueError, KeyError, OSError) as e:
    raise cli.UserError(f'cannot load {fv.checkpoint!r}: {e}') from None
  info = (f'{fv.checkpoint} (step {landmarker.step}, {landmarker.weights} weights): {landmarker.layout} layout, '
          f'{landmarker.image_size} px input, on {jax.default_backend().upper()}')
  app = make_app(landmarker, faces=fv.faces, info=info)
  try:
    server = serving.make_server(HOST, fv.port, app, threaded=True)
  except OSError as e:
    raise cli.UserError(f'cannot serve on {HOST}:{fv.port}: {e}') from None
  print(f'star_jax demo on http://{HOST}:{server.server_port}/ (Ctrl-C to stop)', flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
  return 0


def main(argv=None) -> int:
  return cli.guarded(_demo, argv, __doc__)


if __name__ == '__main__':
  cli.run(main)
