"""Methods: one module per method, each defining a `Method` subclass named `METHOD`.

`get_method(config)` builds the method named by `config.method`; `get_method_class(config)`
is its class (for checks that need no instance).
"""

from __future__ import annotations

import importlib

import ml_collections

from fssjax.methods.base import ConfigError, Method

# config.method -> module under fssjax.methods (imported lazily so that a method's heavy
# dependencies are only loaded when it is used).
REGISTRY = {
    "hsnet": "fssjax.methods.hsnet",
    "diffews": "fssjax.methods.diffews",
    "dsv_lfs": "fssjax.methods.dsv_lfs",
    "llafs": "fssjax.methods.llafs",
    "llmformer": "fssjax.methods.llmformer",
}


def get_method_class(config: ml_collections.ConfigDict) -> type[Method]:
  name = config.method
  if name not in REGISTRY:
    raise ConfigError(f"config.method = {name!r}: unknown method; known: {sorted(REGISTRY)}")
  return importlib.import_module(REGISTRY[name]).METHOD


def get_method(config: ml_collections.ConfigDict) -> Method:
  return get_method_class(config)(config)
