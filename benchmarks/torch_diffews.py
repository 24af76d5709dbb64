"""DiffewS's UNet step in diffusers (PyTorch) and in fssjax, side by side (benchmarks/vs_torch.py).

PyTorch side: diffusers' `UNet2DConditionModel` plus DiffewS's two additions, as the published
DiffewS code builds them on diffusers: an 8-channel (here 2 x in_channels) input conv for the
support branch (`conv_in_ref`, used instead of `conv_in` in the support pass), and the K/V bank
on every self-attention (attn1) of every transformer block: the support pass records each
attn1's own `to_k` / `to_v` outputs, the query pass appends them after its own keys and values
(queries stay the query's own). The bank is an attention processor (`BankAttnProcessor`) that
computes the attention with `torch.nn.functional.scaled_dot_product_attention`, PyTorch's fused
CPU kernel, as diffusers' default `AttnProcessor2_0` does.

fssjax side: `fssjax.nn.unet.UNet2DConditionModel` with `return_kv=True` (support pass,
`conv_in_override`) and `kv_bank=` (query pass), as fssjax.methods.diffews runs it.

Both start from the same weights: diffusers' random initialisation (seeded), converted with
fssjax.weights.diffusers. The VAE is left out (frozen and the same work on both sides): the
inputs are latents. Train step = support pass, query pass with the bank, latent MSE against the
target latent, backward, gradient clipping at 1.0 and AdamW (lr 1e-5, weight decay 0.01) on the
UNet and the support conv; inference = both passes without gradients.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

DEMO_UNET = dict(  # configs/diffews_coco.py:demo's UNet (8 x 8 x 48 space-to-depth latents)
    block_out_channels=[32, 64, 128], layers_per_block=1, attention_head_dim=4,
    cross_attention_dim=32, norm_num_groups=8, in_channels=48, out_channels=48,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    use_linear_projection=True)


class BankAttnProcessor:
  """diffusers attention processor with DiffewS's K/V bank (self-attention only).

  mode 'plain': ordinary attention; 'record': also stores the own (k, v) in `self.kv`;
  'bank': appends `self.bank` = (k_extra, v_extra) [B, S_extra, C] after the own k, v.
  """

  def __init__(self):
    self.mode = "plain"
    self.kv = None
    self.bank = None

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
               temb=None, **kwargs):
    del attention_mask, temb, kwargs
    b = hidden_states.shape[0]
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    q = attn.to_q(hidden_states)
    k = attn.to_k(context)
    v = attn.to_v(context)
    if self.mode == "record":
      self.kv = (k, v)
    elif self.mode == "bank":
      k = torch.cat([k, self.bank[0]], dim=1)
      v = torch.cat([v, self.bank[1]], dim=1)
    heads = attn.heads
    split = lambda x: x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    out = out.transpose(1, 2).reshape(b, -1, heads * (q.shape[-1] // heads))
    out = attn.to_out[0](out)
    return attn.to_out[1](out)


class TorchDiffewS(torch.nn.Module):
  """diffusers UNet + conv_in_ref + the K/V bank processors on every attn1."""

  def __init__(self, unet_config: dict):
    super().__init__()
    from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
    self.unet = UNet2DConditionModel(**unet_config)
    c_in, c0 = unet_config["in_channels"], unet_config["block_out_channels"][0]
    self.conv_in_ref = torch.nn.Conv2d(2 * c_in, c0, 3, padding=1)
    self.banks = {}
    procs = {}
    for name in self.unet.attn_processors:
      if name.endswith("attn1.processor"):
        proc = BankAttnProcessor()
        self.banks[name[:-len(".processor")]] = proc
        procs[name] = proc
      else:
        procs[name] = BankAttnProcessor()  # 'plain' mode: cross-attention
    self.unet.set_attn_processor(procs)

  def forward(self, support_in, query_lat, t, ctx_support, ctx_query, shots: int):
    """support_in [B*K, 2C, h, w] (image ++ mask latents), query_lat [B, C, h, w]."""
    conv_in = self.unet.conv_in
    self.unet.conv_in = self.conv_in_ref
    for p in self.banks.values():
      p.mode = "record"
    try:
      self.unet(support_in, t, ctx_support)
    finally:
      self.unet.conv_in = conv_in
    for p in self.banks.values():
      k, v = p.kv
      merge = lambda a: a.reshape(a.shape[0] // shots, shots * a.shape[1], a.shape[2])  # noqa
      p.bank, p.kv, p.mode = (merge(k), merge(v)), None, "bank"
    try:
      return self.unet(query_lat, t, ctx_query).sample
    finally:
      for p in self.banks.values():
        p.bank, p.mode = None, "plain"


def fssjax_params(model: TorchDiffewS, unet_cfg) -> dict:
  """{'unet': ..., 'conv_in_support': ...}: the torch model's weights for fssjax."""
  from fssjax.weights import diffusers as dw  # pylint: disable=g-import-not-at-top
  sd = {k: v.detach().numpy().copy() for k, v in model.unet.state_dict().items()}
  unet = dw.unet_params_from_state_dict(unet_cfg, sd)
  w = model.conv_in_ref.weight.detach().numpy()
  return {"unet": unet,
          "conv_in_support": {"kernel": np.transpose(w, (2, 3, 1, 0)).copy(),
                              "bias": model.conv_in_ref.bias.detach().numpy().copy()}}


def run(*, unet: str, batch: int, image_size: int, what, rounds: int, steps: int, warmup: int,
        check: bool, interleave: Callable, summary: Callable, device_fraction: Callable
        ) -> list[dict[str, Any]]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from fssjax.methods.diffews import SD21_UNET  # pylint: disable=g-import-not-at-top
  from fssjax.nn import unet as unet_lib  # pylint: disable=g-import-not-at-top

  if unet == "demo":
    raw = dict(DEMO_UNET)
    batch = batch or 16
    image_size = image_size or 64
    latent, channels = image_size // 8, raw["in_channels"]
  else:
    raw = dict(SD21_UNET)
    batch = batch or 1
    image_size = image_size or 256
    latent, channels = image_size // 8, raw["in_channels"]
  shots, t_len = 1, 2
  torch.manual_seed(0)
  model = TorchDiffewS(raw)
  cfg = unet_lib.UNetConfig.from_diffusers(raw)
  net = unet_lib.UNet2DConditionModel(cfg)
  params = jax.tree.map(jnp.asarray, fssjax_params(model, cfg))

  rng = np.random.default_rng(0)
  d = raw["cross_attention_dim"]
  s_in = rng.normal(size=(batch * shots, latent, latent, 2 * channels)).astype(np.float32)
  q_lat = rng.normal(size=(batch, latent, latent, channels)).astype(np.float32)
  target = rng.normal(size=(batch, latent, latent, channels)).astype(np.float32)
  ctx = rng.normal(size=(1, t_len, d)).astype(np.float32)
  timestep = 1.0

  def forward(p, s_in, q_lat):
    kernel = p["conv_in_support"]["kernel"]
    feats = jax.lax.conv_general_dilated(s_in, kernel, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    feats = feats + p["conv_in_support"]["bias"]
    n = s_in.shape[0]
    _, kv = net.apply({"params": p["unet"]}, None, jnp.full((n,), timestep),
                      jnp.broadcast_to(ctx, (n, t_len, d)), return_kv=True,
                      conv_in_override=feats)
    bank = unet_lib.merge_support_bank(kv, shots)
    b = q_lat.shape[0]
    return net.apply({"params": p["unet"]}, q_lat, jnp.full((b,), timestep),
                     jnp.broadcast_to(ctx, (b, t_len, d)), kv_bank=bank)

  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5, weight_decay=0.01))
  opt_state = tx.init(params)

  def train_step(p, o, s_in, q_lat, target):
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean((forward(p, s_in, q_lat) - target) ** 2))(p)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  s_j, q_j, tg_j = jnp.asarray(s_in), jnp.asarray(q_lat), jnp.asarray(target)
  infer = jax.jit(forward).lower(params, s_j, q_j).compile()
  step = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, s_j, q_j,
                                                          tg_j).compile()

  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))  # noqa: E731
  s_t, q_t, tg_t = nchw(s_in), nchw(q_lat), nchw(target)
  t_t = torch.tensor(timestep)
  ctx_s = torch.from_numpy(np.broadcast_to(ctx, (batch * shots, t_len, d)).copy())
  ctx_q = torch.from_numpy(np.broadcast_to(ctx, (batch, t_len, d)).copy())
  records_extra = {}
  if check:
    ours = np.asarray(infer(params, s_j, q_j))
    with torch.no_grad():
      theirs = model(s_t, q_t, t_t, ctx_s, ctx_q, shots).permute(0, 2, 3, 1).numpy()
    err = float(np.max(np.abs(ours - theirs)) / (np.max(np.abs(theirs)) + 1e-12))
    if not err < 1e-3:
      raise AssertionError(f"DiffewS UNet outputs differ between fssjax and diffusers: "
                           f"relative max error {err:.3g}")
    records_extra["check_relative_max_error"] = err

  opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
  box = {"p": params, "o": opt_state}

  def fj_train():
    box["p"], box["o"], loss = step(box["p"], box["o"], s_j, q_j, tg_j)
    jax.block_until_ready(loss)

  def fj_infer():
    jax.block_until_ready(infer(box["p"], s_j, q_j))

  def pt_train():
    model.train()
    out = model(s_t, q_t, t_t, ctx_s, ctx_q, shots)
    loss = F.mse_loss(out, tg_t)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  def pt_infer():
    model.eval()
    with torch.no_grad():
      model(s_t, q_t, t_t, ctx_s, ctx_q, shots)

  pairs = {}
  if "train" in what:
    pairs["diffews_unet_train_step"] = (fj_train, pt_train)
  if "infer" in what:
    pairs["diffews_unet_inference"] = (fj_infer, pt_infer)
  times = interleave(pairs, rounds, steps, warmup)
  import common  # benchmarks/common.py  # pylint: disable=g-import-not-at-top
  flops = {"diffews_unet_train_step": common.flops_of(step),
           "diffews_unet_inference": common.flops_of(infer)}
  out = []
  for name, t in times.items():
    extra = dict(method="diffews", unet=unet, batch=batch, shots=shots, image_size=image_size,
                 latent_size=latent, precision="float32",
                 torch_reference="diffusers UNet2DConditionModel + DiffewS K/V bank processor "
                 "(benchmarks/torch_diffews.py)", **records_extra)
    extra.update(device_fraction(flops[name], statistics.median(t["fssjax"])))
    out.append(summary(name, t, extra))
  return out
