"""Procedurally drawn faces with exact landmarks and controllable annotation ambiguity.

The default data of star_jax: with no dataset downloaded, training runs on these faces. Each face is a
3D-ish template in the WFLW 98-point layout (star_jax.layouts.WFLW), varied in identity, expression
(mouth open, smile, brow raise) and pose (yaw / pitch / roll, mild perspective), projected and drawn
with OpenCV (anti-aliased, sub-pixel vertices) so that every landmark sits on a visible feature: the
contour is the edge of the face against hair / background / neck, the brows are filled shapes whose
outline holds the brow points, the eye lids, lips and nostril line are drawn through their points and
the pupils are the iris centres. Appearance varies in skin tone, hair, lighting gradient, makeup,
random occluders, blur, sensor noise and background (gradient / smooth noise / shapes).

Annotation ambiguity (the study of STAR's claim): the *annotated* training labels are the exact points
moved along the local tangent of their curve (`curve_tangents`), by a Gaussian amount whose standard
deviation is `level x AMBIGUITY_FRACTION[part] x inter-ocular distance`: largest on the face contour
and brows (where human annotators disagree most), small on eyes and lips, zero on the pupils. The
test split is always exact. The image and the exact points do not depend on the level (separate
random streams), so the `level` configs differ only in their training labels. A second model of the
noise (`noise.RELABEL_MODELS`, for the ambiguity study) draws it from a pool of simulated annotators,
each with a consistent habit along the curves (`annotator_biases`), one annotator per face.

Determinism: sample `index` of split `split` is a pure function of (seed, split, index).

Coordinates: 0-based pixel (x, y), pixel centres at integers, as cv2 draws them; images RGB uint8
(H, W, 3).

68-point (300W) and 29-point (COFW) variants take subsets of the 98 points (`WFLW_TO_300W`,
`WFLW_TO_COFW`), so they carry the same (tangential) label noise.

Modules: `params` (what decides a face, its attribute flags), `template` (the 3D landmark template and
its projection), `render` (drawing it), `noise` (the annotation ambiguity), `subsets` (the 68 / 29
point layouts), `samples` (seeded samples and the dataset records), `preview` (a contact sheet).
"""

from star_jax.data.synthetic.noise import AMBIGUITY_FRACTION
from star_jax.data.synthetic.noise import ANNOTATOR_BIAS_SHARE
from star_jax.data.synthetic.noise import PART_SLICES
from star_jax.data.synthetic.noise import RELABEL_MODELS
from star_jax.data.synthetic.noise import ambiguity_fractions
from star_jax.data.synthetic.noise import annotator_biases
from star_jax.data.synthetic.noise import annotator_noise
from star_jax.data.synthetic.noise import curve_tangents
from star_jax.data.synthetic.noise import inter_ocular
from star_jax.data.synthetic.noise import tangential_noise
from star_jax.data.synthetic.params import FaceParams
from star_jax.data.synthetic.params import attribute_flags
from star_jax.data.synthetic.params import neutral_params
from star_jax.data.synthetic.params import sample_params
from star_jax.data.synthetic.render import Rendered
from star_jax.data.synthetic.render import render
from star_jax.data.synthetic.samples import RelabelledSource
from star_jax.data.synthetic.samples import Sample
from star_jax.data.synthetic.samples import encode_image
from star_jax.data.synthetic.samples import generate
from star_jax.data.synthetic.samples import sample_rngs
from star_jax.data.synthetic.subsets import WFLW_TO_300W
from star_jax.data.synthetic.subsets import WFLW_TO_COFW
from star_jax.data.synthetic.subsets import point_map
from star_jax.data.synthetic.template import rotation
from star_jax.data.synthetic.template import template

__all__ = [
    'AMBIGUITY_FRACTION',
    'ANNOTATOR_BIAS_SHARE',
    'FaceParams',
    'PART_SLICES',
    'RELABEL_MODELS',
    'RelabelledSource',
    'Rendered',
    'Sample',
    'WFLW_TO_300W',
    'WFLW_TO_COFW',
    'ambiguity_fractions',
    'annotator_biases',
    'annotator_noise',
    'attribute_flags',
    'curve_tangents',
    'encode_image',
    'generate',
    'inter_ocular',
    'neutral_params',
    'point_map',
    'render',
    'rotation',
    'sample_params',
    'sample_rngs',
    'tangential_noise',
    'template',
]
