"""Where training reports go: TensorBoard event files, JSON lines, and a progress bar."""

from __future__ import annotations

import json
import pathlib
import time


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard events in `workdir/tb/`."""

  def __init__(self, workdir: pathlib.Path, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # a light dependency: no tensorflow needed
    self._tb = SummaryWriter(str(pathlib.Path(workdir) / 'tb'))
    self._jsonl = open(pathlib.Path(workdir) / 'metrics.jsonl', 'a')

  def write_scalars(self, step: int, scalars: dict[str, float]):
    if not self.enabled:
      return
    for key, value in scalars.items():
      self._tb.add_scalar(key, value, step)
    self._jsonl.write(json.dumps({'step': int(step), 'time': time.time(), **scalars}) + '\n')
    self._jsonl.flush()
    self._tb.flush()

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
      import tqdm
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
