from pathlib import Path

from setuptools import find_packages, setup


def read_version() -> str:
    for line in Path("cosy/__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("cosy/__init__.py has no __version__")


setup(
    name="cosy",
    version=read_version(),
    description="An open, end-to-end, zero-shot text-to-speech research framework",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cosy", "cosy.*"]),
    include_package_data=True,
    package_data={"cosy": ["assets/**/*"]},
    install_requires=[
        # Any torch >= 2.1 works; the CI installs the CPU build first so pip keeps it.
        "torch>=2.1",
        "numpy",
        "scipy",
        "soundfile",
        "soxr",
        "librosa",
        "pyyaml",
        "safetensors",
        "pyarrow",
        "tokenizers",
        "tqdm",
        "tensorboard",
        "onnx",
        "onnxruntime",
        "wetext",
        "jiwer",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "kaldi-native-fbank", "nbclient", "nbformat", "ipykernel", "matplotlib"],
        "hf": ["transformers"],
        "eval": ["pocketsphinx", "speechmos", "webrtcvad-wheels", "resemblyzer"],
        "deepspeed": ["deepspeed>=0.17.2"],  # its torch_autocast section carries bf16 (cosy/train/trainer.py)
    },
    entry_points={"console_scripts": ["cosy=cosy.cli:main"]},
)
