"""fssjax: few-shot and open-vocabulary segmentation with language and diffusion priors."""

__version__ = "0.1.0"
