"""Defaults shared by every experiment: every config file starts from `get_config()`
(`from medseg_jax import defaults`), and a config must have exactly these keys.

Config files import no jax and compute nothing about devices: global batch,
steps per epoch and the LR scaling factor are derived at build time and logged.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """Every key of a config with its default value."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  _model(c)
  _data(c)
  _split(c)
  _training(c)
  _running(c)
  return c


def _model(c: ml_collections.ConfigDict) -> None:
  """The network."""
  c.model = ml_collections.ConfigDict()
  c.model.name = "unet"            # unet | fcn | your own: module:Class or file.py:Class
  c.model.kwargs = ml_collections.ConfigDict()  # to the network's constructor (docs/components.md:
                                   # "Your own network, loss and plugins")
  c.model.base_features = 64       # U-Net first level / VGG first block width
  c.model.depth = 4                # U-Net pooling levels
  c.model.pooling = ()             # unet3d: each level's (D,H,W) pooling factors, 1 or 2;
                                   # () = 2 along every axis at every level
  c.model.max_features = 0         # unet3d: the widest level's channels; 0 = no cap
  c.model.fc_features = 4096       # FCN fc6/fc7 width (as convolutions)
  c.model.norm = "none"            # none | group | batch (batch is synced across devices)
  c.model.dropout = 0.0
  c.model.compute_dtype = "float32"  # float32 | bfloat16 (params stay float32)
  c.model.init_from = ""           # "" = random init | a VGG-16 file for fcn (MatConvNet .mat,
                                   # Keras .h5) | a run or checkpoints directory (fine-tune)
  c.model.init_checkpoint = "best"  # for a run: best | latest | a step number



def _data(c: ml_collections.ConfigDict) -> None:
  """The dataset, its preprocessing, split and augmentation."""
  c.data = ml_collections.ConfigDict()
  c.data.root = ""                 # Decathlon task directory (dataset.json inside)
  c.data.synthetic = False         # write a synthetic Decathlon dataset: to WORKDIR/data when
                                   # root is "", or into root only if it is an existing empty
                                   # directory (a misspelt root stays "not found")
  c.data.synthetic_volumes = 16
  c.data.synthetic_shape = (96, 96, 48)
  c.data.cache_dir = ""            # slice stores (one per dataset + settings); "" = slice_cache/
                                   # beside data.root. Multi-host: on storage every host sees
  c.data.preprocess_workers = 0    # processes building a slice store; 0 = every CPU core
  c.data.skip_invalid = False      # False: any bad subject stops the run (exit 2), all listed;
                                   # True: bad subjects are left out, with a warning
  c.data.modalities = ()           # channels, by dataset.json modality name (or index); () = all
  c.data.label_map = ()            # source label i -> class label_map[i]; () keeps labels
  c.data.regions = ()              # region-based training: label sets (after label_map), one
                                   # sigmoid output each, e.g. ((1, 2, 3), (2, 3), (3,));
                                   # () = one softmax output per class (docs/regions.md)
  c.data.regions_class_order = ()  # the label each region writes back, in order; () = its
                                   # smallest label no later region holds
  c.data.slice_axis = 2
  c.data.slice_selection = "central"  # central: slices_per_volume central slices | all |
                                   # foreground: slices with foreground + empty_slice_fraction
  c.data.slices_per_volume = 70    # central: slices kept per volume; 0 = all
  c.data.empty_slice_fraction = 0.0  # foreground: share of the empty slices kept, evenly spaced
  c.data.image_size = 240          # in-plane size of the slices
  c.data.resize = "resize"         # resize (linear images, nearest labels) | pad_crop (centred)
  c.data.normalisation = "zscore_nonzero"  # per volume and channel: zscore_nonzero (z-score
                                   # over non-zero voxels) | percentile (clip, rescale to [0, 1])
  c.data.clip_percentiles = (0.5, 99.5)  # percentile: the clipping range
  c.data.spatial_dims = 2          # 2: slices (the keys above) | 3: whole volumes and patches
  # 3D (a value of 3 above): volumes resampled to one voxel spacing, trained on patches
  c.data.target_spacing = ()       # mm along the RAS axes; () = the dataset's median spacing
  c.data.volume_normalisation = "auto"  # per channel: auto (ct for a modality named CT,
                                   # else mri) | mri (z-score over non-zero voxels) | zscore
                                   # (z-score over the whole volume) | ct
  c.data.ct_clip_percentiles = (0.5, 99.5)  # ct: clip to these percentiles of the training
                                   # foreground, then z-score with its mean and std
  c.data.crop_to_nonzero = False   # store (and predict) each volume's box of non-zero
                                   # voxels only; outside it a prediction is background
  c.data.foreground_samples = 10000  # foreground voxels kept per class and volume to centre
                                   # forced patches on
  c.data.patch_size = (64, 64, 64)  # voxels (D, H, W) of a training patch and inference window
  c.data.foreground_fraction = 1 / 3  # share of every global batch centred on foreground
  c.data.augment = ml_collections.ConfigDict()  # on device, per example, training only
  c.data.augment.enabled = False
  c.data.augment.samples_per_epoch = 0     # draws per epoch, each slice floor/ceil as often,
                                   # each freshly augmented; 0 = one pass over the training
                                   # slices. The thesis's 35,000 makes its epoch length in
                                   # steps; without `enabled` it only repeats slices (warning).
                                   # 3D: patches per epoch; 0 = one per training volume
  c.data.augment.rotation_degrees = 45.0   # uniform in [-r, r]
  c.data.augment.zoom = (0.8, 1.2)         # uniform scale range
  c.data.augment.translate_pixels = 25.6   # uniform shift in [-t, t] along each in-plane axis
  c.data.augment.flip_probability = 0.0    # chance of a flip along each in-plane axis
  c.data.augment.intensity_scale = 0.0     # image x uniform [1 - s, 1 + s]
  c.data.augment.intensity_shift = 0.0     # image + uniform [-s, s]



def _split(c: ml_collections.ConfigDict) -> None:
  """Which subjects train, validate and test."""
  c.data.val_fraction = 0.15       # split by volume, from data.split_seed
  c.data.test_fraction = 0.15
  # Draws the split (and a synthetic dataset); unset = `seed`. Set, it holds the data fixed
  # while `seed` varies initialisation and batch order (the study and the guideline do).
  c.data.split_seed = config_dict.placeholder(int)
  # Cross-validation: set, the subjects outside the test split form data.num_folds folds
  # (from data.split_seed) and fold data.fold validates; unset, data.val_fraction does.
  c.data.fold = config_dict.placeholder(int)
  c.data.num_folds = 5


def _training(c: ml_collections.ConfigDict) -> None:
  """The optimizer, the LR policy and the training loop."""
  c.optim = ml_collections.ConfigDict()
  c.optim.name = "sgd"             # sgd | adam | adamw | lars
  c.optim.lr = 1e-5                # base LR for the reference batch
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 0.0
  c.optim.grad_clip_norm = 0.0     # 0 = no clipping
  c.optim.lars_trust_coefficient = 0.001

  c.lr = ml_collections.ConfigDict()  # lengths in epochs, converted with the real steps/epoch
  c.lr.scaling = "linear"          # none | linear | sqrt, by k = global / reference batch
  c.lr.reference_batch_size = 0    # 0 = the per-device batch (k = number of devices)
  c.lr.policy = "standard"         # standard (warmup + decay below) | grescale
  c.lr.warmup = "none"             # none | constant (base LR) | gradual (base LR -> k-scaled)
  c.lr.warmup_epochs = 5.0
  c.lr.decay = "none"              # none | step | cosine | poly
  c.lr.step_epochs = (30.0, 60.0, 80.0)  # step decay: multiply by step_factor at each
  c.lr.step_factor = 0.1
  c.lr.poly_power = 0.9            # poly decay: (1 - t/T)^power, as nnU-Net
  c.lr.grescale = ml_collections.ConfigDict()  # GreScale's "initial LR" is optim.lr (eta)
  c.lr.grescale.warmup_epochs = 5.0  # linear warmup: eta -> scaled LR (k x eta if linear)
  c.lr.grescale.decay_epochs = 0.0  # 0 = 3/7 of the epochs after the first 5
  # Stabilisation holds factor x scaled LR, factor in (0, 1]. The thesis says "smaller" than
  # the warmup's target and gives no value: halving is clearly smaller yet stays above eta
  # from k = 3 devices on, so the larger batch still gets a larger LR.
  c.lr.grescale.stabilisation_factor = 0.5
  # Decay, time-based from the held LR: held / (1 + c x epochs into the decay); a larger
  # c decays faster (at 0.1 the LR is halved after 10 epochs of decay).
  c.lr.grescale.decay_coefficient = 0.1

  c.train = ml_collections.ConfigDict()
  c.train.per_device_batch_size = 7
  c.train.num_epochs = 100
  c.train.num_steps = 0            # 0 = derive from num_epochs
  c.train.loss = "dice_ce"         # dice | ce | dice_ce | your own: module:fn or file.py:fn
  c.train.eval_every_steps = 500   # 0 = only at the end
  c.train.eval_batch_size = 0      # per device; 0 = per_device_batch_size
  c.train.plugins = ()             # components the loop calls: module:Class or file.py:Class
  c.train.plugin_kwargs = ml_collections.ConfigDict()  # plugin class name -> its keywords
  c.train.early_stopping_patience = 0  # validations with no better Dice before stopping; 0 = off
  c.train.divergence_factor = 10.0   # stop when the mean loss of the last patience steps ...
  c.train.divergence_patience = 50   # ... exceeds factor x its lowest; factor 0 = only non-finite



def _running(c: ml_collections.ConfigDict) -> None:
  """Evaluation, devices, checkpoints and monitoring."""
  c.evaluation = ml_collections.ConfigDict()  # 3D: sliding-window inference over whole
                                   # volumes (validation, --mode=evaluate, --mode=predict)
  c.evaluation.window_overlap = 0.5  # windows overlap by this share of the patch per axis
  c.evaluation.gaussian_sigma = 0.125  # importance weights: sigma as a share of the patch
  c.evaluation.largest_component_foreground = False  # prediction keeps only the largest
                                   # connected component of the foreground ...
  c.evaluation.largest_component_classes = ()  # ... then of these classes (tuning.crossval
                                   # decides both on out-of-fold predictions)
  c.evaluation.mirror = False      # test-time mirroring in evaluation and prediction: the
                                   # mean probabilities over every flip of each 3D window
                                   # (8 passes) or 2D slice's rows and columns (4 passes)

  c.parallel = ml_collections.ConfigDict()
  c.parallel.strategy = "shard_map"  # shard_map | pmap | gspmd | your own: module:Class or
                                   # file.py:Class (parallel/strategies.py: Parallel)
  c.parallel.num_devices = 0       # 0 = all devices of all processes
  c.parallel.distributed_timeout_seconds = 60  # multi-process: coordinator and dead-peer bound
  c.parallel.gpu_preallocate = True  # XLA_PYTHON_CLIENT_PREALLOCATE (JAX's default)
  c.parallel.gpu_memory_fraction = 0.0  # XLA_PYTHON_CLIENT_MEM_FRACTION; 0 = JAX's default

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000  # 0 = only at the end
  c.checkpoint.max_to_keep = 3

  c.monitor = ml_collections.ConfigDict()
  c.monitor.log_every_steps = 50
  c.monitor.enabled = True         # TensorBoard events, system sampling, progress bar
  c.monitor.system_interval_seconds = 10.0  # 0 = no system sampling
  c.monitor.profile_steps = ()     # consecutive steps to trace with jax.profiler, e.g.
                                   # (10, 11): docs/evaluation_and_monitoring.md
