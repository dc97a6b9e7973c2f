"""Only the package list, which pyproject.toml cannot express: every ``astroprep_torch*`` package
found in the source tree plus ``astroprep_torch.configs``, the top-level ``configs/`` folder mapped
into the package (``[tool.setuptools.package-dir]`` in pyproject.toml). Everything else is in
pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["astroprep_torch*"]) + ["astroprep_torch.configs"])
