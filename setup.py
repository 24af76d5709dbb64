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
    # TensorBoard event files: written by fssjax.monitoring with the tensorboard package
    # (no TensorFlow).
    "tensorboard>=2.16",
    "pycocotools>=2.0.7",
    "einops>=0.8",
    "transformers>=4.45",
    "safetensors>=0.4",
    "pillow>=10",
    "numpy>=1.26",
    "absl-py>=2.1",
    # The language side (fssjax.priors, fssjax.nn.llama / bert).
    "tokenizers>=0.20",
    "gguf>=0.10",
    "jinja2>=3.1",
    "openai>=3.57",
    "jsonschema>=4.20",
    # Open-vocabulary priors: image descriptions parsed into objects, attributes, relations
    # (fssjax.priors.scene_graph); Hungarian matching (fssjax.nn.matching).
    "scipy>=1.11",
    "spacy>=3.8,<3.9",
    "SceneGraphParser==0.1.0",
    # LLaFS polygons (contours) and region tables (SLIC superpixels).
    "opencv-python-headless>=4.8",
    "scikit-image>=0.22",
    # launch/: sweeps on Slurm, TPU VMs and local processes.
    "submitit>=1.5",
    "PyYAML>=6",
]

setuptools.setup(
    name="fssjax",
    version="0.1.0",
    description="Few-shot and open-vocabulary segmentation with language and diffusion priors, in JAX/Flax.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["fssjax", "fssjax.*", "launch", "launch.*"]),
    package_data={"fssjax.priors": ["descriptions/*.json"],
                  "fssjax.data": ["class_names/*.txt", "class_names/*.md"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "respx>=0.23",
                 # notebooks/fewshot_demo.ipynb runs in the tests
                 "matplotlib>=3.8", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6"],
        # benchmarks/vs_torch.py: the PyTorch side of the side-by-side benchmark.
        "bench": ["torch==2.13.0", "diffusers>=0.30"],
    },
)
