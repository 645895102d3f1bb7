"""pip install -e . makes fedml_core, fedml_api and fedml_experiments importable."""
from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.split("#")[0].strip()
    for line in (Path(__file__).parent / "requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip() and not line.startswith("pytest")
]

setup(
    name="fedml-mpi",
    version="0.1.0",
    description="MPI-based distributed FedAvg for PyTorch models (FedML-style layout)",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["fedml_core*", "fedml_api*", "fedml_experiments*"]),
    package_data={"fedml_api.model.YOLOv3": ["cfg/*.cfg"]},
    install_requires=requirements,
    extras_require={"test": ["pytest>=7.4"]},
)
