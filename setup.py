"""Install segearthr1: `bash scripts/setup.sh` (handles the torch -> deepspeed order) or `pip install -e .`."""
from setuptools import find_packages, setup

setup(
    name="segearthr1",
    version="0.1.0",
    description="SegEarth-R1: geospatial pixel reasoning with a language model (reference-quality implementation)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["segearthr1", "segearthr1.*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "transformers>=4.40",
        "timm>=0.9",
        "peft>=0.10",
        "deepspeed>=0.14",
        "accelerate>=0.26",
        # HF datasets is not used directly, but transformers' Trainer probes `import datasets`; without
        # the real package our top-level datasets/ folder is found as a namespace package and breaks it.
        "datasets>=2.14",
        "pycocotools>=2.0.7",
        "opencv-python-headless>=4.8",
        "numpy>=1.24",
        "tqdm>=4.60",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "scipy>=1.10",
        "rasterio>=1.3",
        "shapely>=2.0",
        "pillow>=9.0",
        "pyproj>=3.4",
        "matplotlib>=3.7",
        "tensorboard>=2.14",
        "gradio>=4.0",
    ],
    # selenium drives Debian's headless chromium in the browser tests (skipped when chromium is absent).
    extras_require={"test": ["pytest>=7.4", "pytest-timeout>=2.1", "selenium>=4.15"]},
    entry_points={"console_scripts": ["segearthr1=segearthr1.cli:main"]},
)
