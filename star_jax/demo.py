"""A local web page: upload a photo, see its landmarks and ambiguity ellipses, download the JSON.

  python -m star_jax.demo --pretrained wflw [--port 7860] [--faces largest|best|all]
  python -m star_jax.demo --checkpoint DIR [--config NAME] ...

Needs the demo extra (Flask): pip install -e '.[demo]'. The page is served on 127.0.0.1 only (this
machine; nothing is reachable from the network) until Ctrl-C. --pretrained runs a released official
model (fetched into the cache on first use, as predict does); --checkpoint is what predict takes: a
star_jax checkpoint directory or training workdir (its best checkpoint by the official protocol, with
the weights that won there), or an official .pkl (its net; converted in memory; --config
wflw|300w|cofw or a config file, by default chosen by its number of points). The page's header and
every JSON answer say which checkpoint, step and weights run. Faces are found by the offline BlazeFace
detector; the largest face is kept by default, as predict and the Python API do (the page's menu, or
--faces, chooses best or all); each face's landmarks are drawn with their 1-sigma ambiguity ellipses
(the covariance STAR models), and the JSON (boxes, scores, landmarks (x, y) and covariances in image
pixels) can be downloaded.

The page is one HTML file with a few lines of JavaScript (no framework, nothing from the internet);
the server is Flask's (Werkzeug), which is enough for one user on one machine.

Bounded work: uploads of more than 32 MB are refused (413), and so are images of more than
--max_pixels (200 million), read from the file's header before decoding (413). One photo is processed
at a time; up to --max_waiting more wait their turn, and beyond that the server answers 503 (busy) at
once, so a large photo never piles up memory or blocks the page for long. Faces are detected on a copy
shrunk to 2048 px (the landmarks use the full resolution), and the picture sent back is shrunk to
4096 px on its longer side (the JSON's coordinates stay in the photo's pixels). Every answer is JSON,
errors too ({"error": ...}, 400/404/405/413/500/503); the page shows the error, and the server log
says what went wrong (with the traceback for an unexpected failure).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import threading
import time

from absl import flags
import cv2
import jax
import numpy as np

from star_jax import cli
from star_jax import pretrained
from star_jax.inference import face_detect
from star_jax.inference import image_io
from star_jax.inference import landmarker as landmarker_lib

HOST = '127.0.0.1'
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
# Requests that may wait while one is processed; more are answered 503 at once.
MAX_WAITING = 2
# The longer side of the annotated picture sent back (a 12000 px photo would make a 30 MB answer).
PICTURE_MAX_SIDE = 4096

_log = logging.getLogger('star_jax.demo')

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
  let response, data;
  try {{
    response = await fetch('predict', {{method: 'POST', body: new FormData(form)}});
    const text = await response.text();
    try {{ data = JSON.parse(text); }} catch (e) {{ data = {{error: response.status + ' ' + response.statusText}}; }}
  }} catch (e) {{
    status.className = 'error'; status.textContent = 'error: cannot reach the server (' + e.message + ')'; return;
  }}
  if (!response.ok) {{
    status.className = 'error'; status.textContent = 'error: ' + (data.error || response.status); return;
  }}
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


def decode_upload(data: bytes, max_pixels: int | None = image_io.DEFAULT_MAX_PIXELS,
                  name: str = 'the upload') -> np.ndarray:
  """The uploaded file as uint8 (H, W, 3) RGB; image_io.ImageTooLargeError over `max_pixels` (from
  its header, before decoding) and image_io.ImageError (a ValueError) when it is not an image."""
  try:
    return image_io.decode(data, name, max_pixels)
  except image_io.ImageTooLargeError:
    raise
  except image_io.ImageError:
    raise image_io.ImageError(f'{name}: this file is not an image that can be read (JPEG, PNG, BMP, TIFF, '
                              'WebP...)') from None


def _picture(image: np.ndarray) -> tuple[bytes, float]:
  """The annotated picture as JPEG bytes, shrunk to PICTURE_MAX_SIDE, and the shrink factor."""
  small, sx, _ = image_io.reduced(image, PICTURE_MAX_SIDE)
  ok, jpeg = cv2.imencode('.jpg', cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
  if not ok:
    raise RuntimeError('OpenCV cannot encode the picture as JPEG')
  return jpeg.tobytes(), 1.0 / sx


def make_app(landmarker, *, faces: str = 'largest', info: str = '', max_pixels: int | None = image_io.DEFAULT_MAX_PIXELS,
             max_waiting: int = MAX_WAITING):
  """The Flask app of the page: GET / (the page), POST /predict (multipart 'image', 'faces',
  'ambiguity') -> JSON {width, height, num_points, layout, faces: [FaceResult.to_dict()], picture:
  JPEG data URL, picture_scale, seconds}; every error as JSON {error} with its status: 400 (not an
  image, a bad field), 404, 405, 413 (over MAX_UPLOAD_BYTES or max_pixels), 500 (logged with its
  traceback), 503 (one photo in work and `max_waiting` waiting already)."""
  import flask  # lazy: optional extra (the 'demo' extra)
  from werkzeug import exceptions  # lazy: optional extra (the 'demo' extra; Flask's errors)

  app = flask.Flask('star_jax.demo')
  app.config['MAX_CONTENT_LENGTH'] = MAX_UPLOAD_BYTES
  # One prediction at a time: the landmarker (its detector and the compiled network) is shared, and
  # one decoded photo at a time bounds the memory. The slots bound the requests holding or awaiting it.
  lock = threading.Lock()
  slots = threading.BoundedSemaphore(1 + max(0, int(max_waiting)))
  html_page = page(info, faces)

  def refuse(status: int, message: str, **headers):
    _log.warning('POST /predict: %d %s', status, message)
    response = flask.jsonify(error=message)
    response.status_code = status
    response.headers.update(headers)
    return response

  @app.get('/')
  def index():
    return flask.Response(html_page, mimetype='text/html')

  @app.post('/predict')
  def run():
    upload = flask.request.files.get('image')
    if upload is None:
      return refuse(400, 'no image uploaded')
    mode = flask.request.form.get('faces', faces)
    if mode not in face_detect.FACE_MODES:
      return refuse(400, f'faces must be one of {", ".join(face_detect.FACE_MODES)}')
    ambiguity = flask.request.form.get('ambiguity') == '1'
    name = upload.filename or 'the upload'
    data = upload.read()
    try:  # the pixel count from the header, before waiting for a turn
      image_io.check_size(image_io.header_size(data), name, max_pixels)
    except image_io.ImageTooLargeError as e:
      return refuse(413, str(e))
    if not slots.acquire(blocking=False):
      return refuse(503, f'busy: one photo is being processed and {max_waiting} wait; try again in a moment',
                    **{'Retry-After': '5'})
    try:
      with lock:
        try:
          image = decode_upload(data, max_pixels, name)
        except image_io.ImageTooLargeError as e:
          return refuse(413, str(e))
        except ValueError as e:
          return refuse(400, str(e))
        start = time.perf_counter()
        landmarker.faces = mode
        results = landmarker(image)
        picture = landmarker.draw(image, results, show_ambiguity=ambiguity)
        jpeg, scale = _picture(picture)
        seconds = time.perf_counter() - start
    finally:
      slots.release()
    h, w = image.shape[:2]
    record = {'image': upload.filename, 'width': w, 'height': h, **landmarker.describe(),
              'num_points': None if not results else int(results[0].landmarks.shape[0]),
              'coordinates': '0-based image pixels (x, y); covariances in pixels^2',
              'faces': [r.to_dict() for r in results], 'seconds': seconds, 'picture_scale': scale,
              'picture': 'data:image/jpeg;base64,' + base64.b64encode(jpeg).decode('ascii')}
    if not results:
      record['num_points'] = 0
    return flask.Response(json.dumps(record), mimetype='application/json')

  @app.errorhandler(413)
  def too_large(_):
    return refuse(413, f'the file is larger than {MAX_UPLOAD_BYTES // 2**20} MB')

  @app.errorhandler(exceptions.HTTPException)
  def http_error(error):
    response = flask.jsonify(error=f'{error.code} {error.name}: {error.description}')
    response.status_code = error.code
    return response

  @app.errorhandler(Exception)
  def failure(error):
    _log.exception('%s %s failed', flask.request.method, flask.request.path)
    return refuse(500, f'internal error ({type(error).__name__}: {error}); the server log has the details')

  return app


def _demo(argv: list[str]) -> int:
  command = cli.Command(__doc__, argv)
  fv = command.fv
  flags.DEFINE_string('checkpoint', None, 'star_jax checkpoint directory (or training workdir), or an official .pkl',
                      flag_values=fv)
  flags.DEFINE_string('config', None, 'for an official .pkl only: wflw, 300w, cofw or a config file', flag_values=fv)
  flags.DEFINE_integer('port', 7860, 'port on 127.0.0.1 (0: any free port)', lower_bound=0, upper_bound=65535,
                       flag_values=fv)
  pretrained.define_flag(fv)
  flags.DEFINE_enum('faces', 'largest', list(face_detect.FACE_MODES), 'faces per photo, by default (the page can '
                    'change it)', flag_values=fv)
  flags.DEFINE_float('min_face_size', face_detect.DEFAULT_MIN_FACE_SIZE, 'smallest face side searched for (px)',
                     lower_bound=1e-6, flag_values=fv)
  flags.DEFINE_float('min_face_score', face_detect.DEFAULT_SCORE_THRESHOLD, 'least BlazeFace score of a face',
                     lower_bound=0.0, upper_bound=1.0, flag_values=fv)
  flags.DEFINE_integer('max_pixels', image_io.DEFAULT_MAX_PIXELS, 'refuse uploads of more pixels than this, read '
                       "from the file's header before decoding (0: no limit)", lower_bound=0, flag_values=fv)
  flags.DEFINE_integer('max_waiting', MAX_WAITING, 'requests that may wait while one photo is processed (more get '
                       '503, busy)', lower_bound=0, flag_values=fv)
  rest = command.parse()
  if rest:
    raise flags.Error(f'unexpected arguments: {" ".join(rest)}')
  pretrained.check_flags(fv, checkpoint_only=('config',))
  try:
    from werkzeug import serving  # lazy: optional extra (the 'demo' extra; Flask's server)
    import flask  # noqa: F401  # lazy: optional extra (the 'demo' extra; checked before loading the model)
  except ImportError:
    raise cli.UserError("the demo needs Flask: pip install -e '.[demo]' (or pip install flask)") from None
  cli.setup_logging('warning')  # the refusals and failures of requests, with their cause
  options = {'faces': fv.faces, 'min_face_size': fv.min_face_size, 'min_face_score': fv.min_face_score}
  try:
    if fv.pretrained is not None:
      landmarker = landmarker_lib.FaceLandmarker.from_pretrained(fv.pretrained, **options)
    else:
      landmarker = landmarker_lib.FaceLandmarker.from_checkpoint(fv.checkpoint, config=fv.config, **options)
  except (pretrained.DownloadError, pretrained.ReleaseFileError) as e:
    raise cli.UserError(str(e)) from None
  except (FileNotFoundError, ValueError, KeyError, OSError) as e:
    raise cli.UserError(f'cannot load {fv.checkpoint!r}: {e}') from None
  info = f'{landmarker.summary()}, {landmarker.image_size} px input, on {jax.default_backend().upper()}'
  app = make_app(landmarker, faces=fv.faces, info=info, max_pixels=fv.max_pixels or None, max_waiting=fv.max_waiting)
  try:
    server = serving.make_server(HOST, fv.port, app, threaded=True)
  except OSError as e:
    raise cli.UserError(f'cannot serve on {HOST}:{fv.port}: {e}') from None
  print(f'star_jax demo on http://{HOST}:{server.server_port}/ (Ctrl-C to stop), running {landmarker.summary()}',
        flush=True)
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
