"""Methods: one module per method, each defining a `Method` subclass named `METHOD`.

`get_method(config)` builds the method named by `config.method`.
"""

from __future__ import annotations

import importlib

import ml_collections

from fssjax.methods.base import Method

# config.method -> module under fssjax.methods (imported lazily so that a method's heavy
# dependencies are only loaded when it is used).
REGISTRY = {
    "hsnet": "fssjax.methods.hsnet",
    "diffews": "fssjax.methods.diffews",
}


def get_method(config: ml_collections.ConfigDict) -> Method:
  name = config.method
  if name not in REGISTRY:
    raise ValueError(f"Unknown method {name!r} in config.method; known: {sorted(REGISTRY)}")
  module = importlib.import_module(REGISTRY[name])
  return module.METHOD(config)
