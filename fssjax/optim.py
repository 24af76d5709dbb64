"""The optimiser of a run: learning-rate schedule and optax chain from `config.optimizer`.

Schedules: linear warm-up from 0 over `optimizer.warmup_steps`, then 'constant', 'linear'
(to 0 at `train.num_steps`) or 'cosine' (to 0 at `train.num_steps`). Optimisers: 'adam' (L2
weight decay added to the gradient, PyTorch `Adam`), 'adamw' (decoupled decay, PyTorch
`AdamW`), 'sgd' (momentum `optimizer.momentum`, default 0.9); `grad_clip > 0` clips by global
norm first. The base learning rate stays out of the compiled program (`Optimizer`).
"""

from __future__ import annotations

import dataclasses

import ml_collections
import optax

from fssjax.methods.base import ConfigError


def make_schedule(opt: ml_collections.ConfigDict, num_steps: int,
                  peak: float | None = None) -> optax.Schedule:
  """Learning-rate schedule: linear warm-up from 0 over `opt.warmup_steps` to `peak`
  (default `opt.lr`), then 'constant', 'linear' (-> 0 at `num_steps`) or 'cosine' (-> 0 at
  `num_steps`)."""
  lr = float(opt.lr if peak is None else peak)
  warmup = int(opt.warmup_steps)
  if warmup < 0 or (warmup and warmup >= num_steps and opt.schedule != "constant"):
    raise ConfigError(f"optimizer.warmup_steps={warmup} must be >= 0 and < train.num_steps="
                      f"{num_steps} (a demo config scales its warm-up when its argument "
                      "sets the steps, e.g. ':demo,steps=100')")
  decay_steps = max(num_steps - warmup, 1)
  if opt.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif opt.schedule == "linear":
    main = optax.linear_schedule(lr, 0.0, decay_steps)
  elif opt.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps)
  else:
    raise ConfigError(f"optimizer.schedule={opt.schedule!r}; expected constant, linear or "
                     "cosine")
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """The optimiser of a run, with the base learning rate kept out of the compiled program.

  `tx` runs the configured optimiser with the learning-rate *profile* (warm-up and decay,
  peak 1); the train step multiplies its updates by `base_lr`, a runtime argument. Every
  optimiser here (Adam with L2, AdamW with decoupled decay, SGD with momentum) is linear in
  the learning rate, so this equals the optimiser built with `schedule` (up to float rounding),
  and runs that differ only in `optimizer.lr` share one compiled step (sweeps; the persistent
  compilation cache).
  """

  tx: optax.GradientTransformation
  profile: optax.Schedule
  base_lr: float

  def schedule(self, step):
    """The learning rate of step `step` (= base_lr * profile(step))."""
    return self.base_lr * self.profile(step)


def make_optimizer(config: ml_collections.ConfigDict) -> Optimizer:
  """The optimiser of `config.optimizer` (applied to `params` only).

  adam: Adam, `weight_decay` as an L2 term added to the gradient (PyTorch `Adam`);
  adamw: decoupled weight decay scaled by the learning rate (PyTorch `AdamW`);
  sgd: SGD with `optimizer.momentum` (default 0.9 when the key is absent; 0 = plain SGD) and
  L2 weight decay. `grad_clip > 0` clips by global norm first. Adam's moment decays and
  epsilon are `optimizer.b1`, `b2`, `eps` (PyTorch's defaults 0.9, 0.999, 1e-8 when absent;
  LISA / DSV-LFS use b2 = 0.95).
  """
  opt = config.optimizer
  profile = make_schedule(opt, int(config.train.num_steps), peak=1.0)
  wd = float(opt.weight_decay)
  betas = dict(b1=float(opt.get("b1", 0.9)), b2=float(opt.get("b2", 0.999)),
               eps=float(opt.get("eps", 1e-8)))
  for key in ("b1", "b2"):
    if not 0.0 <= betas[key] < 1.0:
      raise ConfigError(f"optimizer.{key}={betas[key]}: a moment decay must be in [0, 1)")
  parts = []
  if float(opt.grad_clip) > 0:
    parts.append(optax.clip_by_global_norm(float(opt.grad_clip)))
  if opt.name == "adam":
    if wd:
      parts.append(optax.add_decayed_weights(wd))
    parts.append(optax.adam(profile, **betas))
  elif opt.name == "adamw":
    parts.append(optax.adamw(profile, weight_decay=wd, **betas))
  elif opt.name == "sgd":
    momentum = float(opt.get("momentum", 0.9))
    if wd:
      parts.append(optax.add_decayed_weights(wd))
    parts.append(optax.sgd(profile, momentum=momentum or None))
  else:
    raise ConfigError(f"optimizer.name={opt.name!r}; expected adam, adamw or sgd")
  return Optimizer(tx=optax.chain(*parts), profile=profile, base_lr=float(opt.lr))
