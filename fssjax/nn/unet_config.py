"""The UNet's layout: diffusers' `UNet2DConditionModel` config parsed into `UNetConfig`.

Unsupported values raise ValueError naming the field (see `UNetConfig.from_diffusers`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Tuple

from fssjax.nn.unet_blocks import get_activation

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)

# Fields that must keep diffusers' default value (the feature is not implemented here).
_MUST_BE_DEFAULT = {
    "dropout": 0.0,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "time_embedding_type": "positional",
    "time_cond_proj_dim": None,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
}
# Fields diffusers accepts that have no effect on the supported block types (they only reach
# Simple*/ResnetDownsample* blocks or the additional-embedding heads).
_NO_EFFECT = ("resnet_skip_time_act", "resnet_out_scale_factor", "mid_block_only_cross_attention",
              "cross_attention_norm", "addition_embed_type_num_heads")
_HANDLED = ("sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos",
            "freq_shift", "down_block_types", "mid_block_type", "up_block_types",
            "only_cross_attention", "block_out_channels", "layers_per_block",
            "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups",
            "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
            "attention_head_dim", "num_attention_heads", "use_linear_projection",
            "upcast_attention", "resnet_time_scale_shift", "time_embedding_dim",
            "time_embedding_act_fn", "timestep_post_act", "conv_in_kernel", "conv_out_kernel")


def _per_block(field: str, value: Any, n: int, kind: type) -> tuple:
  """Expands an int/bool/float to n copies, or checks a list has n entries of `kind`."""
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"UNet config field {field!r} = {list(value)} has {len(value)} entries; "
                       f"expected one per down block ({n})")
    items = tuple(value)
  else:
    items = (value,) * n
  for item in items:
    if isinstance(item, (list, tuple)):
      raise ValueError(f"UNet config field {field!r} = {value!r}: nested lists "
                       "(asymmetric UNets) are not supported")
    if kind is bool:
      if not isinstance(item, bool):
        raise ValueError(f"UNet config field {field!r} = {value!r}: expected booleans")
    elif not isinstance(item, (int, float)) or isinstance(item, bool):
      raise ValueError(f"UNet config field {field!r} = {value!r}: expected numbers")
    elif kind is int and int(item) != item:
      raise ValueError(f"UNet config field {field!r} = {value!r}: expected integers")
  return tuple(kind(i) for i in items)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Resolved UNet layout (per-down-block tuples; the up path uses them reversed).

  `num_heads` is the resolved number of attention heads per down block: diffusers'
  `num_attention_heads` when set, else `attention_head_dim` (diffusers' naming quirk: in
  `UNet2DConditionModel` configs `attention_head_dim` is the number of heads; head width =
  channels // heads, e.g. SD 2.1's [5, 10, 20, 20] gives 64-wide heads).
  """

  block_out_channels: Tuple[int, ...]
  down_block_types: Tuple[str, ...]
  up_block_types: Tuple[str, ...]
  layers_per_block: Tuple[int, ...]
  transformer_layers_per_block: Tuple[int, ...]
  num_heads: Tuple[int, ...]
  cross_attention_dim: Tuple[int, ...]
  only_cross_attention: Tuple[bool, ...]
  mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
  in_channels: int = 4
  out_channels: int = 4
  sample_size: Any = None
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  use_linear_projection: bool = False
  upcast_attention: bool = False
  resnet_time_scale_shift: str = "default"
  time_embedding_dim: Optional[int] = None
  time_embedding_act_fn: Optional[str] = None
  timestep_post_act: Optional[str] = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any],
                     ignore_fields: Sequence[str] = ()) -> "UNetConfig":
    """Parses a diffusers `UNet2DConditionModel` config dict.

    Args:
      config: the dict of `unet/config.json`.
      ignore_fields: extra field names to skip (for example DiffewS's `in_channels_ref`).
        Fields starting with '_' (`_class_name`, `_diffusers_version`) are always skipped.

    Raises:
      ValueError: naming the field and value for anything unknown or unsupported.
    """
    known = set(_HANDLED) | set(_MUST_BE_DEFAULT) | set(_NO_EFFECT)
    for key in config:
      if key.startswith("_") or key in ignore_fields:
        continue
      if key not in known:
        raise ValueError(f"UNet config field {key!r} = {config[key]!r} is not a supported "
                         "UNet2DConditionModel field")
    for key, default in _MUST_BE_DEFAULT.items():
      if key in config and config[key] != default:
        raise ValueError(f"UNet config field {key!r} = {config[key]!r} is not supported "
                         f"(only {default!r})")
    get = lambda k, d: config.get(k, d)  # noqa: E731

    down = tuple(get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = tuple(get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    for field, types, allowed in (("down_block_types", down, DOWN_BLOCKS),
                                  ("up_block_types", up, UP_BLOCKS)):
      for t in types:
        if t not in allowed:
          raise ValueError(f"UNet config field {field!r} contains {t!r}; supported: {allowed}")
    mid = get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in MID_BLOCKS:
      raise ValueError(f"UNet config field 'mid_block_type' = {mid!r} is not supported; "
                       f"supported: {MID_BLOCKS}")
    channels = tuple(int(c) for c in get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(down)
    if len(up) != n or len(channels) != n:
      raise ValueError(f"UNet config: down_block_types ({n}), up_block_types ({len(up)}) and "
                       f"block_out_channels ({len(channels)}) must have the same length")
    heads_src = get("num_attention_heads", None)
    heads_field = "num_attention_heads"
    if heads_src is None:
      heads_src, heads_field = get("attention_head_dim", 8), "attention_head_dim"
    heads = _per_block(heads_field, heads_src, n, int)
    if get("attention_head_dim", 8) is not None:
      _per_block("attention_head_dim", get("attention_head_dim", 8), n, int)
    norm_groups = get("norm_num_groups", 32)
    if norm_groups is None:
      raise ValueError("UNet config field 'norm_num_groups' = None is not supported")
    for c in channels:
      if c % norm_groups:
        raise ValueError(f"UNet config: block_out_channels {channels} not divisible by "
                         f"norm_num_groups={norm_groups}")
    shift = get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
      raise ValueError(f"UNet config field 'resnet_time_scale_shift' = {shift!r} is not "
                       "supported; expected 'default' or 'scale_shift'")
    act = get("act_fn", "silu")
    get_activation(act, "act_fn")
    for field in ("time_embedding_act_fn", "timestep_post_act"):
      if get(field, None) is not None:
        get_activation(get(field, None), field)
    for field in ("conv_in_kernel", "conv_out_kernel"):
      k = get(field, 3)
      if not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ValueError(f"UNet config field {field!r} = {k!r}: expected an odd positive int")
    only_cross = _per_block("only_cross_attention", get("only_cross_attention", False), n, bool)
    cross_dims = _per_block("cross_attention_dim", get("cross_attention_dim", 1280), n, int)
    if len(set(cross_dims)) != 1:
      raise ValueError(f"UNet config field 'cross_attention_dim' = {list(cross_dims)}: per-block "
                       "values must be equal (one encoder_hidden_states feeds every block)")
    return cls(
        block_out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        layers_per_block=_per_block("layers_per_block", get("layers_per_block", 2), n, int),
        transformer_layers_per_block=_per_block(
            "transformer_layers_per_block", get("transformer_layers_per_block", 1), n, int),
        num_heads=heads,
        cross_attention_dim=cross_dims,
        only_cross_attention=only_cross,
        mid_block_type=mid,
        in_channels=int(get("in_channels", 4)),
        out_channels=int(get("out_channels", 4)),
        sample_size=(tuple(get("sample_size", None)) if isinstance(get("sample_size", None), list)
                     else get("sample_size", None)),
        center_input_sample=bool(get("center_input_sample", False)),
        flip_sin_to_cos=bool(get("flip_sin_to_cos", True)),
        freq_shift=float(get("freq_shift", 0)),
        downsample_padding=int(get("downsample_padding", 1)),
        mid_block_scale_factor=float(get("mid_block_scale_factor", 1.0)),
        act_fn=act,
        norm_num_groups=int(norm_groups),
        norm_eps=float(get("norm_eps", 1e-5)),
        use_linear_projection=bool(get("use_linear_projection", False)),
        upcast_attention=bool(get("upcast_attention", False)),
        resnet_time_scale_shift=shift,
        time_embedding_dim=get("time_embedding_dim", None),
        time_embedding_act_fn=get("time_embedding_act_fn", None),
        timestep_post_act=get("timestep_post_act", None),
        conv_in_kernel=int(get("conv_in_kernel", 3)),
        conv_out_kernel=int(get("conv_out_kernel", 3)),
    )
