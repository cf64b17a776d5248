"""Package discovery for pyproject.toml: every package under the top-level folders, installed as `adaflex.*`
(the folder mapping is pyproject's `package-dir`), so a new method folder needs no packaging edit."""

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from setuptools import find_packages, setup

here = Path(__file__).parent
package_dir = tomllib.loads((here / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
packages = [
    f"{name}{sub[len(folder):]}"
    for name, folder in package_dir.items()
    for sub in find_packages(where=str(here), include=[folder, f"{folder}.*"])
]
setup(packages=packages)
