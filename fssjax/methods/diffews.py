"""DiffewS (NeurIPS 2024): a Stable Diffusion UNet turned into a one-step few-shot segmenter.

Published recipe (Zhu et al., NeurIPS 2024; code aim-uofa/DiffewS):
  * Images and masks at 512x512 in [-1, 1]; a mask is a white-on-black RGB image. Both go
    through the frozen KL-VAE encoder (posterior mean x 0.18215).
  * Support branch: a second input conv with 8 channels (support image latent ++ support mask
    latent), initialised from the UNet's own conv_in kernel repeated along the input channels
    and halved (so it initially computes the mean of the two inputs' conv_in responses). A
    DiffewS-layout checkpoint (`conv_in_ref.*` in unet/, e.g. a trained DiffewS release) brings
    its own support conv, which is used as is.
  * The support pass runs the UNet on each support and records K and V of every self-attention
    (attn1) of every transformer block. The query pass appends the bank to its own K and V
    (queries stay the query's own). K supports: all K x HW support tokens in one bank.
  * One step, timestep 1, empty text prompt. The scheduler is DDIM with v-prediction and
    beta = 1 (alpha_bar = 0), so the predicted clean latent is x0 = -v: the training target of
    the UNet output is the *negated* query-mask latent, with a latent MSE loss.
  * Prediction: decode x0 = -v, clip to [-1, 1], map to 8-bit [0, 1]; foreground where the
    mean over RGB exceeds 0.25 x the largest single RGB value of the image; predictions are
    resized to the scored size with nearest neighbours.
  * The UNet is fully fine-tuned; VAE and text encoder are frozen (here: the VAE parameters and
    the precomputed empty-prompt embedding live in `frozen`, never in the optimiser state).

Our `predict` returns `mean_rgb - 0.25 * max(rgb)` (or `mean_rgb - t` for the absolute
threshold) as the score with `threshold = 0`; the evaluator resizes it with nearest neighbours.

Autoencoders (`config.model.autoencoder`):
  * 'kl': the Stable-Diffusion AutoencoderKL (`fssjax.nn.vae`), loaded from
    `config.model.sd_path` (a diffusers-layout directory with unet/, vae/, text_encoder/,
    tokenizer/). Without a path it is randomly initialised from `config.model.vae`: only for
    tests and benchmarks, a warning says so.
  * 'space_to_depth': the offline stand-in used by the demo, where no pretrained VAE exists: a
    parameter-free, lossless pixel <-> latent map that folds each f x f pixel patch into
    channels (latent [H/f, W/f, 3 f^2]). The UNet then works on a latent that carries exactly
    the image information, and its MSE is the pixel MSE. Documented in configs/diffews_coco.py.

Config keys (`config.model`, defaults in `_DEFAULTS`; any other key is an error): sd_path,
autoencoder, space_to_depth_factor, unet (diffusers UNet config dict, used without sd_path;
empty = SD 2.1's), vae (diffusers VAE config dict, 'kl' without sd_path; empty = SD 2.1's),
timestep, mask_threshold_kind ('relative' | 'absolute'), mask_threshold, remat,
allow_pickle_weights, dtype, trainable (default: 'unet/.*' and 'conv_in_support/.*', the
published full fine-tuning; the VAE and the prompt embedding 'context' are frozen).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import einops
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fssjax.methods.base import ConfigError, Method, PyTree, compute_dtype, replace_leaves
from fssjax.nn import unet as unet_lib
from fssjax.nn import vae as vae_lib

# SD 2.1's UNet layout (diffusers unet/config.json of stabilityai/stable-diffusion-2-1).
SD21_UNET = dict(
    act_fn="silu", attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, cross_attention_dim=1024,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"],
    downsample_padding=1, dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0,
    in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-05,
    norm_num_groups=32, out_channels=4, sample_size=96,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"],
    use_linear_projection=True)

# SD 2.1's VAE layout (vae/config.json).
SD21_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, in_channels=3, latent_channels=4,
    layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=768,
    up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215)

# Tokens of the empty prompt with padding="do_not_pad": [BOS, EOS] (as DiffewS encodes it).
EMPTY_PROMPT_TOKENS = 2


def mask_to_rgb(mask: jax.Array) -> jax.Array:
  """uint8 mask [..., H, W] (1 fg; 0 and 255 bg) -> white-on-black RGB in [-1, 1] [..., H, W, 3]."""
  fg = (mask == 1).astype(jnp.float32)
  return jnp.repeat((2.0 * fg - 1.0)[..., None], 3, axis=-1)


def _repeat_halve(conv_in: PyTree) -> dict:
  """DiffewS's support conv from the UNet's conv_in: the kernel [3, 3, C, C0] repeated over
  (image latent ++ mask latent) -> [3, 3, 2C, C0] and halved; the bias as is."""
  kernel = conv_in["kernel"]
  cat = np.concatenate if isinstance(kernel, np.ndarray) else jnp.concatenate
  return {"kernel": cat([kernel, kernel], axis=2) / 2.0, "bias": conv_in["bias"]}


class SpaceToDepthAutoencoder:
  """Parameter-free lossless stand-in for the VAE: f x f pixel patches <-> latent channels."""

  def __init__(self, factor: int):
    self.factor = int(factor)
    self.latent_channels = 3 * self.factor ** 2

  def encode(self, x: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> [B, H/f, W/f, 3 f^2]."""
    f = self.factor
    if x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"space_to_depth autoencoder: image size {x.shape[1:3]} is not a "
                       f"multiple of the factor {f}")
    return einops.rearrange(x, "b (h p) (w q) c -> b h w (p q c)", p=f, q=f)

  def decode(self, z: jax.Array) -> jax.Array:
    """[B, h, w, 3 f^2] -> [B, h f, w f, 3]."""
    f = self.factor
    return einops.rearrange(z, "b h w (p q c) -> b (h p) (w q) c", p=f, q=f)


_DEFAULTS = dict(
    sd_path="",
    autoencoder="kl",
    space_to_depth_factor=4,
    unet={},
    vae={},
    timestep=1,
    mask_threshold_kind="relative",
    mask_threshold=0.25,
    remat=False,
    allow_pickle_weights=False,
    dtype="",
)


class DiffewS(Method):
  """DiffewS behind the fssjax Method interface (see the module docstring)."""

  MODEL_DEFAULTS = _DEFAULTS
  TRAINABLE = ("unet/.*", "conv_in_support/.*")
  kshot = "joint"
  threshold = 0.0
  normalization = "minus_one_one"
  align_corners = False
  interpolation = "nearest"

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    m = self.opts
    self.dtype = compute_dtype(config)
    self.timestep = float(m["timestep"])
    self.threshold_kind = m["mask_threshold_kind"]
    if self.threshold_kind not in ("relative", "absolute"):
      raise ConfigError(f"config.model.mask_threshold_kind = {self.threshold_kind!r}; "
                        "expected 'relative' or 'absolute'")
    self.mask_threshold = float(m["mask_threshold"])
    self.sd_path = m["sd_path"] or ""
    self.autoencoder_kind = m["autoencoder"]
    remat = bool(m["remat"])
    if self.sd_path:
      from fssjax.weights import diffusers as dw  # noqa: PLC0415
      if not os.path.isdir(self.sd_path):
        raise FileNotFoundError(
            f"config.model.sd_path = {self.sd_path!r} does not exist: expected a diffusers-layout "
            "Stable Diffusion directory (unet/, vae/, text_encoder/, tokenizer/), for example a "
            "local copy of stabilityai/stable-diffusion-2-1. Without weights run the demo: "
            "python -m fssjax.main --config=configs/diffews_coco.py:demo --workdir=runs/diffews")
      # Only the configs are read here; the weights come in `load_pretrained`.
      unet_cfg = dw.unet_config(self.sd_path)
      vae_cfg = dw.vae_config(self.sd_path) if self.autoencoder_kind == "kl" else None
    else:
      unet_cfg = unet_lib.UNetConfig.from_diffusers(dict(m["unet"] or SD21_UNET))
      vae_cfg = vae_lib.VAEConfig.from_diffusers(dict(m["vae"] or SD21_VAE))
    self.unet = unet_lib.UNet2DConditionModel(unet_cfg, dtype=self.dtype, remat=remat)
    if self.autoencoder_kind == "kl":
      self.vae = vae_lib.AutoencoderKL(vae_cfg, dtype=self.dtype)
      self.latent_channels = self.vae.config.latent_channels
    elif self.autoencoder_kind == "space_to_depth":
      self.vae = SpaceToDepthAutoencoder(m["space_to_depth_factor"])
      self.latent_channels = self.vae.latent_channels
    else:
      raise ConfigError(f"config.model.autoencoder = {self.autoencoder_kind!r}; expected 'kl' "
                        "or 'space_to_depth'")
    ucfg = self.unet.config
    if ucfg.in_channels != self.latent_channels or ucfg.out_channels != self.latent_channels:
      raise ConfigError(
          f"UNet in/out channels ({ucfg.in_channels}, {ucfg.out_channels}) do not match the "
          f"autoencoder's latent channels ({self.latent_channels}); set config.model.unet's "
          "in_channels and out_channels")
    self.bank_keys = unet_lib.kv_bank_keys(ucfg)

  @classmethod
  def missing_inputs(cls, config: ml_collections.ConfigDict) -> list[str]:
    path = config.model.get("sd_path", "") or ""
    if not path:
      return []
    where = os.path.abspath(path)
    if not os.path.isdir(path):
      return [f"model.sd_path = {path!r}: no such directory ({where}); expected a "
              "diffusers-layout Stable Diffusion 2.1 (unet/, vae/, text_encoder/, tokenizer/), "
              "e.g. a local copy of stabilityai/stable-diffusion-2-1"]
    absent = [c for c in ("unet", "vae", "text_encoder", "tokenizer")
              if not os.path.isdir(os.path.join(path, c))]
    if absent:
      return [f"model.sd_path = {path!r}: {where} lacks the component folder(s) {absent}"]
    return []

  # -- Autoencoder (frozen) -------------------------------------------------------------

  def _encode(self, frozen: PyTree, images: jax.Array) -> jax.Array:
    """[N, H, W, 3] in [-1, 1] -> scaled latents [N, h, w, C] (posterior mean), no gradient."""
    if self.autoencoder_kind == "kl":
      z = self.vae.apply({"params": frozen["vae"]}, images.astype(self.dtype or jnp.float32),
                         method=self.vae.encode_latents)
    else:
      z = self.vae.encode(images)
    return jax.lax.stop_gradient(z.astype(jnp.float32))

  def _decode(self, frozen: PyTree, latents: jax.Array) -> jax.Array:
    if self.autoencoder_kind == "kl":
      x = self.vae.apply({"params": frozen["vae"]}, latents.astype(self.dtype or jnp.float32),
                         method=self.vae.decode_latents)
    else:
      x = self.vae.decode(latents)
    return x.astype(jnp.float32)

  # -- Parameters -------------------------------------------------------------------------

  def init(self, rng: jax.Array, batch: Mapping[str, Any]) -> dict:
    """{unet, conv_in_support, vae, context}: random (Flax initialisers), pure and traceable.

    The support conv is the UNet's conv_in kernel repeated over (image latent ++ mask latent)
    and halved; the context is the empty prompt's embedding (zeros until `load_pretrained`
    computes it with the text encoder); 'vae' is empty for the space_to_depth stand-in.
    """
    h, w = batch["query_image"].shape[1:3]
    if self.autoencoder_kind == "kl":
      f = 2 ** (len(self.vae.config.block_out_channels) - 1)
    else:
      f = self.vae.factor
    latent = jnp.zeros((1, h // f, w // f, self.latent_channels), jnp.float32)
    cross_dim = self.unet.config.cross_attention_dim[0]
    r_unet, r_vae = jax.random.split(rng)
    context = jnp.zeros((1, EMPTY_PROMPT_TOKENS, cross_dim), jnp.float32)
    unet_params = self.unet.init(r_unet, latent, jnp.ones((1,)), context)["params"]
    vae_params = {}
    if self.autoencoder_kind == "kl":
      vae_params = self.vae.init(r_vae, jnp.zeros((1, h, w, 3), jnp.float32))["params"]
    return {"unet": unet_params, "conv_in_support": _repeat_halve(unet_params["conv_in"]),
            "vae": vae_params, "context": context}

  def load_pretrained(self, params: PyTree | None, frozen: PyTree) -> tuple[Any, Any]:
    """Stable Diffusion of `model.sd_path`: UNet and VAE tensor by tensor into the sharded
    trees, the support conv (the checkpoint's `conv_in_ref` or the repeated-and-halved
    conv_in), and the empty prompt's embedding from the text encoder (run once, dropped)."""
    if not self.sd_path:
      if self.autoencoder_kind == "kl":
        logging.warning("DiffewS: no config.model.sd_path; the VAE is randomly initialised "
                        "(only meaningful for tests and benchmarks).")
      return params, frozen
    from fssjax.weights import diffusers as dw  # noqa: PLC0415
    allow = bool(self.opts["allow_pickle_weights"])
    unet_items, support = dw.stream_component(self.sd_path, "unet", allow_pickle=allow)
    items = [("unet/" + p, t) for p, t in unet_items]
    if support is not None:
      logging.info("DiffewS: support conv loaded from the checkpoint's conv_in_ref")
      k = dict(support)
      if k["kernel"]().shape[2] != 2 * self.latent_channels:
        raise ValueError(f"{self.sd_path}: the UNet's conv_in_ref takes "
                         f"{k['kernel']().shape[2]} channels; DiffewS needs image latent ++ "
                         f"mask latent = {2 * self.latent_channels}")
      items += [("conv_in_support/" + n, t) for n, t in support]
    else:
      conv = {n: t for p, t in unet_items for n in ("kernel", "bias") if p == f"conv_in/{n}"}
      halved = lambda: np.asarray(_repeat_halve({"kernel": conv["kernel"](),  # noqa: E731
                                                 "bias": conv["bias"]()})["kernel"])
      items += [("conv_in_support/kernel", halved), ("conv_in_support/bias", conv["bias"])]
    if self.autoencoder_kind == "kl":
      vae_items, _ = dw.stream_component(self.sd_path, "vae", allow_pickle=allow)
      items += [("vae/" + p, t) for p, t in vae_items]
    items.append(("context", lambda: self._empty_prompt_embedding(dw, allow)))
    return replace_leaves(params, frozen, items)

  def _empty_prompt_embedding(self, dw, allow_pickle: bool) -> np.ndarray:
    """The text encoder's last hidden state of the empty prompt [1, 2, D] (computed once)."""
    text_encoder, text_params = dw.load_text_encoder(
        os.path.join(self.sd_path, "text_encoder"), dtype=self.dtype, allow_pickle=allow_pickle)
    tokenizer = dw.load_tokenizer(os.path.join(self.sd_path, "tokenizer"))
    ids = tokenizer("", padding="do_not_pad", truncation=True,
                    max_length=tokenizer.model_max_length)["input_ids"]
    out = text_encoder.apply({"params": text_params}, jnp.asarray([ids], jnp.int32))
    return np.asarray(out["last_hidden_state"], np.float32)

  # -- Forward ----------------------------------------------------------------------------

  def _support_features(self, params: PyTree, x: jax.Array) -> jax.Array:
    """The 8-channel support conv_in: [N, h, w, 2C] -> [N, h, w, block_out_channels[0]]."""
    kernel = params["conv_in_support"]["kernel"]
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype or jnp.float32), kernel.astype(self.dtype or jnp.float32),
        window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + params["conv_in_support"]["bias"].astype(y.dtype)

  def _v_prediction(self, params: PyTree, frozen: PyTree, batch: dict[str, jax.Array],
                    extra_images: jax.Array | None = None):
    """Runs the support pass and the query pass.

    Returns (v [B, h, w, C] float32, latents of `extra_images` or None). All VAE encodes of
    the step (query, supports, support masks and `extra_images`) run as one batch.
    """
    q = batch["query_image"]
    s = batch["support_images"]
    b, k = s.shape[:2]
    s_flat = einops.rearrange(s, "b k h w c -> (b k) h w c")
    sm_flat = mask_to_rgb(einops.rearrange(batch["support_masks"], "b k h w -> (b k) h w"))
    parts = [q, s_flat, sm_flat] + ([] if extra_images is None else [extra_images])
    latents = self._encode(frozen, jnp.concatenate([p.astype(jnp.float32) for p in parts], 0))
    q_lat, s_lat, sm_lat = latents[:b], latents[b:b + b * k], latents[b + b * k:b + 2 * b * k]
    extra_lat = None if extra_images is None else latents[b + 2 * b * k:]

    t = jnp.full((b * k,), self.timestep, jnp.float32)
    ctx = frozen["context"]
    feats = self._support_features(params, jnp.concatenate([s_lat, sm_lat], axis=-1))
    _, kv = self.unet.apply({"params": params["unet"]}, None, t,
                            jnp.broadcast_to(ctx, (b * k,) + ctx.shape[1:]),
                            return_kv=True, conv_in_override=feats)
    bank = unet_lib.merge_support_bank(kv, k)
    v = self.unet.apply({"params": params["unet"]}, q_lat.astype(self.dtype or jnp.float32),
                        jnp.full((b,), self.timestep, jnp.float32),
                        jnp.broadcast_to(ctx, (b,) + ctx.shape[1:]), kv_bank=bank)
    return v.astype(jnp.float32), extra_lat

  def loss(self, params: PyTree, frozen: PyTree, batch: dict[str, jax.Array],
           rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Latent MSE between the UNet's v-prediction and the negated query-mask latent."""
    del rng  # one deterministic step: no noise is drawn
    v, mask_lat = self._v_prediction(params, frozen, batch, mask_to_rgb(batch["query_mask"]))
    loss = jnp.mean(jnp.square(v + mask_lat))
    return loss, {"latent_mse": loss}

  def decode_mask(self, frozen: PyTree, v: jax.Array) -> jax.Array:
    """v [B, h, w, C] -> the decoded mask image [B, H, W, 3] in [0, 1], as the published
    pipeline hands it to its evaluation: decode(-v), clip to [-1, 1], map to [0, 255], cast
    to 8 bits (truncation, NumPy's astype(uint8)) and read back / 255
    (`MarigoldPipeline.single_infer` 'seg' mode, then `seg_colored` and `to_tensor`)."""
    rgb = jnp.clip(self._decode(frozen, -v), -1.0, 1.0)
    return jnp.floor((rgb * 0.5 + 0.5) * 255.0) / 255.0

  def predict(self, params: PyTree, frozen: PyTree, batch: dict[str, jax.Array]) -> jax.Array:
    """Scores [B, H, W], foreground where > 0 (see `scores_from_rgb`)."""
    v, _ = self._v_prediction(params, frozen, batch)
    return self.scores_from_rgb(self.decode_mask(frozen, v))

  def scores_from_rgb(self, rgb: jax.Array) -> jax.Array:
    """Decoded mask image [B, H, W, 3] in [0, 1] -> scores [B, H, W], foreground where > 0.

    The published rule (aim-uofa/DiffewS, evaluation_util/main_oss.py, `--r_threshold 0.25`):
    a pixel is foreground when its mean over RGB exceeds 0.25 x the largest single RGB value
    of the image (`pred_mask.max() * r_threshold` over all channels and pixels), or, with
    `mask_threshold_kind='absolute'`, a fixed value (`--threshold`). Pixels (1, 0, 0),
    (.3, .3, .3), (.2, .2, .2): the cut is 0.25, the first two are foreground. The evaluator
    resizes these scores with nearest neighbours (`interpolation`), as the published pipeline
    resizes its decoded image (`F.interpolate(..., mode='nearest')`) before thresholding.
    """
    value = jnp.mean(rgb, axis=-1)
    if self.threshold_kind == "relative":
      cut = self.mask_threshold * jnp.max(rgb, axis=(1, 2, 3))[:, None, None]
    else:
      cut = self.mask_threshold
    return value - cut


METHOD = DiffewS
