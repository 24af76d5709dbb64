"""Blocks shared by the config files: the benchmarks' data settings and the offline demo.

A config file imports this module (`from configs import common`) and composes:

  c = common.base("hsnet")                       # fssjax.configlib.base_config + method
  common.benchmark(c, "coco20i", root=..., fold=..., shot=...)
  ... the method's published recipe ...
  if demo: common.demo(c, a, steps=700, warmup=50, ...)

Benchmarks (published evaluation protocols): COCO-20i and PASCAL-5i score 1000 fixed
episodes per fold; FSS-1000 scores every test image once as a query (`test_episodes = 0`,
2400 episodes) on its single split.
"""

from fssjax import configlib

# The data settings of each benchmark's published few-shot protocol.
BENCHMARKS = {
    "coco20i": dict(dataset="coco20i", test_episodes=1000),
    "pascal5i": dict(dataset="pascal5i", test_episodes=1000),
    "fss1000": dict(dataset="fss1000", test_episodes=0, fold=0),
}


def base(method: str, seed: int = 0):
  """The shared schema (`fssjax.configlib.base_config`) for `method`."""
  c = configlib.base_config()
  c.method = method
  c.seed = seed
  return c


def benchmark(c, name: str, *, root: str = "", fold: int = 0, shot: int = 1,
              image_size: int = 400, eval_resolution: str = "resized", workers: int = 8):
  """Fills `c.data` for benchmark `name` (a key of BENCHMARKS)."""
  spec = dict(BENCHMARKS[name])
  c.data.dataset = spec.pop("dataset")
  c.data.root = root
  c.data.fold = spec.pop("fold", fold)
  c.data.shot = shot
  c.data.image_size = image_size
  c.data.resize = "square"
  c.data.augment = False
  c.data.eval_resolution = eval_resolution
  c.data.workers = workers
  for k, v in spec.items():
    c.data[k] = v
  return c


def scaled_warmup(warmup: int, default_steps: int, steps: int) -> int:
  """The demo's warm-up scaled with its step count (unchanged at the default count)."""
  return int(round(warmup * steps / default_steps))


def demo(c, *, root: str, image_size: int, steps: int, default_steps: int, batch: int,
         lr: float, warmup: int, log_every: int, checkpoint_every: int, eval_batch: int = 16,
         test_episodes: int = 300):
  """The offline demo: the generated synthetic benchmark (COCO format), fold 0, trained from
  scratch with Adam, linear warm-up scaled with `steps` and cosine decay, evaluated once at
  the end on `test_episodes` episodes."""
  c.data.dataset = "synthetic"
  c.data.root = root  # '' = the default cache directory (generated on first use)
  c.data.image_size = image_size
  c.data.test_episodes = test_episodes
  c.data.workers = 0
  c.train.batch_size = batch
  c.train.num_steps = steps
  c.train.log_every = log_every
  c.train.eval_every = 0  # evaluate once, at the end
  c.train.checkpoint_every = checkpoint_every
  c.optimizer.name = "adam"
  c.optimizer.lr = lr
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = scaled_warmup(warmup, default_steps, steps)
  c.optimizer.weight_decay = 0.0
  c.eval.batch_size = eval_batch
  return c


def hsnet_model(c, a):
  """HSNet's published model block from a config's parsed arguments (backbone, weights,
  allow_pickle): learner (16, 64, 128), 1-shot training, the 255 boundary as background in
  the loss (the published loader maps it to 0), the backbone frozen (`model.trainable` at the
  method's default, the learner)."""
  c.model.backbone = a["backbone"]
  c.model.backbone_weights = a["weights"]
  c.model.allow_pickle_weights = a["allow_pickle"]
  c.model.learner_channels = (16, 64, 128)
  # Published: no ignore label in the loss (masks are binary; a 255 label counts as background).
  c.model.loss_boundary = "background"
  c.model.train_support = "first"
  return c
