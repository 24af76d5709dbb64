"""fssjax: few-shot and open-vocabulary segmentation with language and diffusion priors."""

from fssjax import _clu_shim

_clu_shim.install()  # clu's metric writers without TensorFlow (see fssjax/_clu_shim.py)

__version__ = "0.1.0"
