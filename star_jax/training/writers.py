"""Where training reports go: TensorBoard event files, JSON lines, and a progress bar.

Both files are appended in whole units (`files.AppendFile`): one JSON line, one event record per
`write_scalars` call, each in one `write`, cut back off if it fails. A full disk therefore raises
OSError in the training loop (which stops the run and says what was kept) and never leaves half a
line behind. (tensorboardX's own writer appends from a background thread, where such an error would
be lost and its queue would then block the run; the records here are written the way it writes them.)
"""

from __future__ import annotations

import json
import pathlib
import socket
import struct
import time

# tensorboardX writes the event protos without TensorFlow.
from tensorboardX import summary
from tensorboardX.proto import event_pb2, summary_pb2
from tensorboardX.record_writer import masked_crc32c
import tqdm

from star_jax import files


class _EventFile:
  """A TensorBoard event file (TFRecord framing of `Event` protos), written synchronously."""

  def __init__(self, directory: pathlib.Path):
    directory.mkdir(parents=True, exist_ok=True)
    # TensorBoard's file naming; one file per run (a resumed run starts a new one).
    name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}'
    self._file = files.AppendFile(directory / name, line_based=False)
    self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write(self, event) -> None:
    data = event.SerializeToString()
    header = struct.pack('Q', len(data))
    self._file.append(header + struct.pack('I', masked_crc32c(header)) + data + struct.pack('I', masked_crc32c(data)))

  def scalars(self, step: int, scalars: dict[str, float]) -> None:
    values = [v for key, value in scalars.items() for v in summary.scalar(key, value).value]
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

  def close(self) -> None:
    self._file.close()


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard events in `workdir/tb/`.

  `last_step` is the step of the last line written whole (None before the first). Write errors
  (OSError) propagate to the caller.
  """

  def __init__(self, workdir: pathlib.Path, enabled: bool = True):
    self.enabled = enabled
    self.last_step = None
    if not enabled:
      return
    self._jsonl = files.AppendFile(pathlib.Path(workdir) / 'metrics.jsonl')
    self._tb = _EventFile(pathlib.Path(workdir) / 'tb')

  def write_scalars(self, step: int, scalars: dict[str, float]):
    if not self.enabled:
      return
    self._jsonl.append_line(json.dumps({'step': int(step), 'time': time.time(), **scalars}))
    # Text fields (the eval's 'best_weights') go to the JSON lines only: TensorBoard takes numbers.
    self._tb.scalars(step, {k: v for k, v in scalars.items() if not isinstance(v, str)})
    self.last_step = int(step)

  def close(self):
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


class Progress:
  """A tqdm bar over training steps showing images/s and the ETA."""

  def __init__(self, total_steps: int, start_step: int, batch_size: int, enabled: bool = True):
    self.batch_size = batch_size
    self._bar = None
    if enabled:
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True,
                            desc='train', smoothing=0.1)
    self._t0, self._step0 = time.perf_counter(), start_step
    self._postfix = {}

  def update(self, step: int):
    if self._bar is None:
      return
    self._bar.update(step - self._bar.n)
    elapsed = time.perf_counter() - self._t0
    if elapsed > 0 and step > self._step0:
      self._postfix['img/s'] = f'{(step - self._step0) * self.batch_size / elapsed:.1f}'
      self._bar.set_postfix(self._postfix, refresh=False)

  def set_postfix(self, **values):
    self._postfix.update({k: f'{v:.4g}' for k, v in values.items()})

  def close(self):
    if self._bar is not None:
      self._bar.close()
