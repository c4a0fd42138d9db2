"""Shared defaults of every experiment: the official STAR settings (ZhenglinZhou/STAR, conf/alignment.py).

Experiment files call `get_base_config(...)` and change only what differs. Values that the official
command line overrides (batch size 128) follow the command line, as the published models were trained.
"""

import ml_collections


def get_base_config(layout: str, dataset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.layout = layout                 # landmark layout: 'WFLW', '300W' or 'COFW' (star_jax/layouts.py)
  c.seed = 0                        # one seed for initialisation, shuffling and augmentation

  # ---- Data --------------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.name = dataset             # TFDS builder: 'wflw', 'the300w', 'cofw' or 'synthetic_faces'
  c.data.config = ''                # TFDS builder config ('' = the builder's default)
  c.data.data_dir = ''              # TFDS data dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.data.manual_dir = ''            # where the hand-downloaded raw files are, to build a missing dataset
  c.data.skip_bad_examples = False  # a build started here leaves out (and lists) malformed examples
  c.data.train_split = 'train'      # split to train on
  c.data.test_split = 'test'        # split to evaluate on
  c.data.num_workers = 0            # Grain worker processes (0: in the main process; best on 2 cores)
  c.data.prefetch = 2               # batches prefetched per worker when num_workers > 0
  c.data.num_threads = 2            # Grain read threads in the main process
  c.data.image_size = 256           # network input side (px)
  c.data.heatmap_size = 64          # side of the point / edge map targets (px)
  c.data.sigma = 1.5                # Gaussian sigma of the point-map targets, in input pixels (maps are 1/4)
  c.data.max_eval_examples = 0      # 0: the whole test split; >0: only the first N (smoke tests)

  # ---- Augmentation (training only; official Augmentation / RandomTexture) -----------------------
  c.aug = ml_collections.ConfigDict()
  c.aug.prob = 1.0                  # probability of the random geometry (official aug_prob)
  c.aug.flip = 0.5                  # horizontal flip probability, with the layout's flip pairs
  c.aug.shift_sigma = 0.05          # centre shift sigma, in units of the crop side (255 px)
  c.aug.rot_sigma_deg = 18.0        # rotation sigma, degrees
  c.aug.scale_sigma = 0.1           # scale sigma: scale = 1 + N(0, sigma)
  c.aug.occlusion = 0.4             # probability of a random black occluding rectangle
  c.aug.blur = 0.3                  # probability of a box blur
  c.aug.gamma = 0.2                 # probability of a random gamma
  c.aug.noise = 0.2                 # probability of additive Gaussian noise
  c.aug.gray = 0.2                  # probability of turning the image grey

  # ---- Model: StackedHGNetV1 --------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.nstack = 4                # hourglasses
  c.model.nlevels = 4               # depth of each hourglass
  c.model.channels = 256            # feature channels (C)
  c.model.add_coord = True          # CoordConv on the stem and each hourglass
  c.model.use_aam = True            # anisotropic attention module (point and edge maps)
  c.model.dtype = 'float32'         # compute dtype: 'float32' or 'bfloat16' (parameters stay float32)
  c.model.decode = 'landmarks'      # landmarks read from the last stack's soft-argmax ('landmarks', the
                                    # official) or its argmax-decoded point maps ('pointmaps': for
                                    # models trained without a landmark term, loss.kind 'none')

  # ---- Loss -------------------------------------------------------------------------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.kind = 'star'              # landmark loss: 'star' (STARLoss_v2), 'star_v1', 'l1', 'l2', 'smoothl1', 'none'
  c.loss.star_w = 1.0               # STAR regulariser weight w
  c.loss.star_dist = 'smoothl1'     # STAR distance: 'smoothl1' (scale 0.01), 'l1', 'l2', 'wing'
  c.loss.star_eps = 1e-5            # added to eigenvalues before the square root
  c.loss.eig_clamp = 0.0            # >0: clamp eigenvalues to at least this (off in the official code)
  c.loss.star_isotropic = 'pin'     # eigenvectors of numerically isotropic covariances: 'pin' (axes, finite
                                    # gradient) or 'official' (LAPACK's, however ill-conditioned); docs/fidelity.md
  c.loss.weights = (1.0, 10.0, 10.0)  # per stack: landmark loss, AWing point maps, AWing edge maps

  # ---- Optimisation -----------------------------------------------------------------------------
  c.batch_size = 128                # global batch over all devices (official command-line default)
  c.eval_batch_size = 32            # global evaluation batch
  c.num_epochs = 500                # training length, in epochs of the train split
  c.total_steps = 0                 # >0: stop after this many steps instead (smoke tests)
  c.lr = 1e-3                       # Adam learning rate
  c.b1 = 0.9                        # Adam beta1
  c.b2 = 0.999                      # Adam beta2
  c.weight_decay = 0.0              # the official config sets 1e-5 but never passes it to Adam
  c.milestones = (200, 350, 450)    # epochs at which the learning rate is multiplied by gamma
  c.milestone_unit = 'epoch'        # 'epoch' (official) or 'step': the unit of `milestones`
  c.gamma = 0.1                     # step-decay factor
  c.ema = True                      # keep an EMA of weights and BatchNorm statistics
  c.ema_decay = -1.0                # <0: the official 0.5 ** (batch_size / 10000)
  c.init_from = ''                  # fine-tuning: start from these weights (an official .pkl, or a
                                    # star_jax checkpoint dir / workdir); fresh optimizer, step 0
  c.init_from_strict = True         # False: load only the weights that fit (another layout's heads
                                    # stay freshly initialised)

  # ---- Bookkeeping ------------------------------------------------------------------------------
  c.log_every_steps = 50            # training metrics to TensorBoard / JSON lines
  c.eval_every_epochs = 1           # evaluate model and EMA on the test split
  c.checkpoint_every_epochs = 1     # save a checkpoint (also on SIGTERM and at the end)
  c.keep_checkpoints = 3            # latest N kept, besides the best: the lowest NME of the weights and
                                    # their EMA over the evaluations (the official trainer's best_model.pkl)
  c.progress = True                 # progress bar with images/s and ETA
  return c


def shrink_for_smoke_test(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `runlocal` switch: a tiny model and a few steps, to check that everything runs."""
  c.data.image_size = 64
  c.data.heatmap_size = 16
  c.data.max_eval_examples = 16
  c.model.nstack = 2
  c.model.channels = 32
  c.batch_size = 4
  c.eval_batch_size = 8
  c.total_steps = 4
  c.milestones = (1000,)
  c.log_every_steps = 1
  return c
