"""Layouts from names, layout files and checkpoints (star_jax/layouts.py), and what may run under which."""

import json

import ml_collections
import pytest

from star_jax import layouts
from star_jax import checkpoints


def write(path, data):
  path.write_text(json.dumps(data, indent=1))
  return path


MINIMAL = {'num_points': 5, 'edges': [{'points': [0, 1, 2], 'closed': True}, [False, [3, 4]]],
           'flip_pairs': [[0, 2], [3, 4]], 'ocular': [0, [1, 2]]}


def test_builtin_names_and_the_300vw_layout():
  assert layouts.get_layout('wflw') is layouts.WFLW and layouts.get_layout('300vw') is layouts.W300VW
  assert layouts.get_layout(layouts.COFW) is layouts.COFW
  vw, w = layouts.W300VW, layouts.W300
  assert (vw.edges, vw.flip_pairs, vw.ocular, vw.pupil) == (w.edges, w.flip_pairs, w.ocular, w.pupil)
  assert vw.threshold == 0.1 and vw.attributes == ('category1', 'category2', 'category3')
  assert layouts.same_geometry(vw, w) and not layouts.same_geometry(w, layouts.WFLW)
  with pytest.raises(ValueError, match=r"unknown landmark layout 'mine'.*or the path of a layout file"):
    layouts.get_layout('mine')
  with pytest.raises(ValueError, match=r'no layout file .*nope\.json exists'):
    layouts.get_layout('/nope.json')


def test_layout_file_defaults_and_round_trip(tmp_path):
  layout = layouts.get_layout(str(write(tmp_path / 'hand.json', MINIMAL)))
  assert layout.name == 'hand' and layout.num_points == 5
  assert layout.edges == ((True, (0, 1, 2)), (False, (3, 4)))
  assert layout.flip_pairs == ((0, 2), (3, 4)) and layout.flip_permutation().tolist() == [2, 1, 0, 4, 3]
  assert layout.ocular == (0, (1, 2)) and layout.pupil == layout.ocular
  assert (layout.flip_offset, layout.default_norm, layout.threshold, layout.attributes) == (1, 'ocular', 0.1, ())
  # portable: the JSON text of the layout, read back without the file.
  text = layouts.portable(str(tmp_path / 'hand.json'))
  (tmp_path / 'hand.json').unlink()
  assert layouts.get_layout(text) == layout
  assert layouts.portable('300w') == '300w' and layouts.portable(layouts.COFW) == 'COFW'


def test_base_layout_with_overrides(tmp_path):
  layout = layouts.get_layout(str(write(tmp_path / 'm.json', {'base': '300W', 'name': 'my68', 'threshold': 0.08})))
  assert layout.name == 'my68' and layout.threshold == 0.08 and layout.attributes == ()
  assert layouts.same_geometry(layout, layouts.W300) and layout.flip_pairs == layouts.W300.flip_pairs


def test_yaml_layout_file(tmp_path):
  pytest.importorskip('yaml')
  path = tmp_path / 'hand.yaml'
  path.write_text('# five points\nnum_points: 5\nedges:\n  - {points: [0, 1, 2], closed: true}\n'
                  '  - {points: [3, 4]}\nocular: [0, 2]\n')
  assert layouts.get_layout(str(path)).edges == ((True, (0, 1, 2)), (False, (3, 4)))
  path.write_text('num_points: 5\nedges: [\n')
  with pytest.raises(ValueError, match=r'hand\.yaml:3: not valid YAML'):
    layouts.get_layout(str(path))


@pytest.mark.parametrize('change, message', [
    ({'colour': 1}, r"unknown key\(s\) \['colour'\]"),
    ({'num_points': None}, r'missing key\(s\) \[.num_points.\]'),
    ({'edges': []}, '"edges" must be a non-empty list'),
    ({'edges': [{'points': [0, 5]}]}, r'edges\[0\]\.points\[1\]: point index 5 out of range for 5 points'),
    ({'edges': [{'points': [0]}]}, r'edges\[0\]\.points: expected a list of at least 2 point indices'),
    ({'flip_pairs': [[0, 2], [2, 3]]}, r'flip_pairs\[1\]: point 2 is already in flip_pairs\[0\]'),
    ({'flip_pairs': [[1, 1]]}, r'flip_pairs\[0\]: a point cannot swap with itself'),
    ({'ocular': [0]}, r'ocular: expected \[left, right\]'),
    ({'default_norm': 'chin'}, "default_norm"),
    ({'threshold': 5}, '"threshold" must be a number in'),
    ({'base': 'LFW'}, '"base" must be one of'),
])
def test_malformed_layout_files_name_file_and_key(tmp_path, change, message):
  data = dict(MINIMAL, **change)
  data = {k: v for k, v in data.items() if v is not None}
  path = write(tmp_path / 'bad.json', data)
  with pytest.raises(ValueError, match=r'bad\.json: .*' + message):
    layouts.get_layout(str(path))


def test_json_syntax_error_names_the_line(tmp_path):
  path = tmp_path / 'bad.json'
  path.write_text('{\n "num_points": 5,\n "edges": [[true, [0, 1]]\n}\n')
  with pytest.raises(ValueError, match=r'bad\.json:4: not valid JSON'):
    layouts.get_layout(str(path))


def test_checkpoints_store_a_file_layout_and_check_points_not_names(tmp_path):
  path = write(tmp_path / 'hand.json', MINIMAL)
  config = ml_collections.ConfigDict({'layout': str(path), 'data': {'name': 'own_faces', 'image_size': 64}})
  stored = checkpoints.stored_config(config)
  assert layouts.get_layout(stored['layout']) == layouts.get_layout(str(path))
  assert checkpoints.stored_config(ml_collections.ConfigDict({'layout': '300W'}))['layout'] == '300W'

  def cfg(layout):
    return ml_collections.ConfigDict({'layout': layout, 'data': {'name': 'x', 'image_size': 64}})
  checkpoints.check_compatible(cfg('300W'), cfg('300VW'))          # a 300W model evaluates 300VW
  checkpoints.check_compatible(cfg(stored['layout']), cfg(str(path)))
  with pytest.raises(ValueError, match=r'predicts the hand layout \(5 points\).*WFLW layout \(98 points\)'):
    checkpoints.check_compatible(cfg(str(path)), cfg('WFLW'))
  other = write(tmp_path / 'other.json', dict(MINIMAL, edges=[{'points': [0, 1, 2, 3, 4]}]))
  with pytest.raises(ValueError, match=r'\(5 points with other edges\)'):
    checkpoints.check_compatible(cfg(str(path)), cfg(str(other)))
