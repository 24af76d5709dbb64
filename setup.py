"""fssjax: few-shot and open-vocabulary segmentation in JAX/Flax."""
import setuptools

INSTALL_REQUIRES = [
    "jax[cpu]==0.10.2",  # the newest jax for Python 3.11; on GPU install jax[cuda12]==0.10.2 on top
    "flax==0.12.8",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.10",
    "ml_collections>=1.0",
    "clu>=0.0.12",
    # clu's TensorBoard writer imports TensorFlow and the tensorboard hparams plugin.
    "tensorflow-cpu>=2.16",
    "tensorboard>=2.16",
    "tensorflow-datasets>=4.9",
    "pycocotools>=2.0.7",
    "einops>=0.8",
    "transformers>=4.45",
    "safetensors>=0.4",
    "pillow>=10",
    "numpy>=1.26",
    "absl-py>=2.1",
]

setuptools.setup(
    name="fssjax",
    version="0.1.0",
    description="Few-shot and open-vocabulary segmentation with language and diffusion priors, in JAX/Flax.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["fssjax", "fssjax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
    },
)
