"""kdjax: knowledge distillation for JAX/Flax, native to Cloud TPU."""
import setuptools

# Pinned where the API moves between releases (orbax, grain, jax); see
# kdjax/runtime/checkpoint.py for the one module that talks to Orbax.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-datasets==4.9.10",
    "grain==0.2.18",
    "ml-collections==1.1.0",
    "absl-py>=2.1",
    "numpy>=1.26",
    "scikit-learn>=1.4",  # digits dataset and the report's precision/recall/F1
    "scipy>=1.11",  # the report's paired statistics (kdjax/run/paired_stats.py)
    "matplotlib>=3.8",  # report plots
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
    "importlib_resources",  # tensorflow-datasets imports it without declaring it
    "safetensors>=0.4",  # HF checkpoint import (numpy loader, no PyTorch)
    "tokenizers>=0.19",  # WordPiece/BPE tokenizers from HF tokenizer.json
    "gguf>=0.10",  # Llama-family weights and tokenizers from GGUF files
    "flatbuffers>=24.3",  # jax.export serialization (StableHLO, kdjax.serve)
]

EXTRAS_REQUIRE = {
    # jax[tpu] brings libtpu (213 MB), which compiles for Cloud TPU topologies
    # without a TPU: tests/entry/test_aot.py checks the AOT memory/FLOPs report.
    # pytest-xdist: the suite runs in two worker processes (-n 2), each test
    # file in one of them (--dist loadfile: module fixtures built once).
    # fsspec: tests/gcs_fake.py serves gs:// paths from a local folder.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100",
             "jax[tpu]==0.10.2", "fsspec"],
    # gs:// workdirs: etils.epath via gcsfs; Orbax's GCS deletes import
    # google.cloud.storage. launch/tpu.py installs it on the workers.
    "gcs": ["gcsfs", "google-cloud-storage"],
    # benchmarks/step_throughput.py's PyTorch reference (never imported by kdjax).
    "bench": ["torch==2.13.0"],
}

setuptools.setup(
    name="kdjax",
    version="0.1.0",
    description="Knowledge distillation engine for JAX/Flax, native to Cloud TPU",
    packages=setuptools.find_packages(include=["kdjax", "kdjax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
