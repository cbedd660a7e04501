"""Install metadata: environment.yml names the same packages as pyproject.toml."""

import re

import tomllib

from llmbook.env import REPO_ROOT

CONDA_TO_PIP = {"pytorch": "torch"}
NOT_PACKAGES = {"python", "pip"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!;\[]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
    pip_names = {_name(r) for r in reqs if "python_version" not in r}
    deps = (REPO_ROOT / "environment.yml").read_text().split("dependencies:", 1)[1]
    conda = re.findall(r"^  - ([A-Za-z0-9_.-]+[^:\n]*)$", deps, flags=re.M)
    conda_names = {CONDA_TO_PIP.get(_name(c), _name(c)) for c in conda} - NOT_PACKAGES
    assert conda_names == pip_names, conda_names ^ pip_names
