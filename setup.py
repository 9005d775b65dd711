"""Maps the repository's top-level folders onto the ``libra`` namespace package.

The folders keep short names in the repository (``contracts/``, ``ops/`` ...) but install as
``libra.contracts``, ``libra.ops`` ...: those bare names belong to other PyPI projects.
"""

from setuptools import find_packages, setup

TOP_LEVEL = ("contracts", "runtime", "gateway", "processors", "projections", "ops", "tools")

packages = []
package_dir = {}
for top in TOP_LEVEL:
    packages.append(f"libra.{top}")
    package_dir[f"libra.{top}"] = top
    packages.extend(f"libra.{top}.{sub}" for sub in find_packages(top))

setup(packages=packages, package_dir=package_dir)
