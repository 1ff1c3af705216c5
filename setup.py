"""gopher: DeepMind's Gopher model-size sweep in JAX + Haiku."""

from setuptools import find_packages, setup

setup(
    name="gopher",
    version="0.1.0",
    description="Reproduce DeepMind's Gopher model-size sweep (44M ... 280B) in JAX + Haiku",
    python_requires=">=3.11",
    package_data={"gopher": ["csrc/*.cc"]},
    packages=find_packages(
        include=["gopher", "gopher.*", "experiments", "experiments.*", "launch", "launch.*"]
    ),
    install_requires=[
        "jax>=0.10.2,<0.13",
        "dm-haiku>=0.0.17",
        "optax>=0.2.8",
        "ml_collections>=1.1.0",
        "absl-py>=2.1",
        "sentencepiece>=0.2.0",
        "numpy>=1.26",
        "tqdm>=4.66",
        "orbax-checkpoint>=0.12.8",
        "tensorboardX>=2.6",
        "array-record>=0.8.6",  # the embedded corpus's shards
        "etils[epath]>=1.7",  # one path type for local and gs:// (what Orbax uses)
        "gcsfs>=2024.2",  # epath's gs:// backend without TensorFlow
        "google-crc32c>=1.5",  # TensorBoard event records' checksums
        "matplotlib>=3.9",  # the sweep's plots (gopher/plots.py)
        "threadpoolctl>=3.5",  # one BLAS thread for the scaling fits' tiny L-BFGS problems
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "ruff>=0.17",
            "tensorflow-datasets>=4.9.10",
            "gcp-storage-emulator>=2024.8",  # a GCS API server on 127.0.0.1 for tests
            "tensorboard>=2.16",  # an independent reader of our event files in tests
        ],
        # libtpu for TPU VMs and for the planner's deviceless TPU compiles on any host
        # (python -m experiments.plan --topology=v3:32x32); requirements-tpu.lock pins it.
        "tpu": ["jax[tpu]"],
        # The PyTorch peer of `python -m experiments.bench --peer=torch` (make bench-peer).
        "bench": ["torch==2.13.0"],
        # Intel MKL for the fused CPU attention kernel's matmuls (gopher/cpu_kernels.py;
        # without it the kernel uses numpy's OpenBLAS, about 20% slower). In `make`'s venv.
        "cpu": ["mkl>=2025.0; platform_machine == 'x86_64' and sys_platform == 'linux'"],
        # Reading TFDS datasets (c4, wikipedia, pg19 ...) without TensorFlow.
        "data": ["tensorflow-datasets>=4.9.10"],
    },
)
