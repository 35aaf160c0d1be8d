"""Print pip constraints pinning each core dependency (and scikit-learn, the test extra's peer) to
the lowest version pyproject.toml allows, so that CI can check the floors are true."""

import re
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = project["dependencies"] + [r for r in project["optional-dependencies"]["test"] if "scikit" in r]
for requirement in requirements:
    # "name>=floor", or "name>=floor,<ceiling": the floor is what CI pins
    name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)(?:,<[0-9.]+)?", requirement.replace(" ", "")).groups()
    print(f"{name}=={floor}")
