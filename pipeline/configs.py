"""Where the Hydra configs are: `conf/` at the top of a checkout (an editable install reads it there), or
`pipeline/conf/` inside an installed wheel (pyproject.toml ships `conf/` as the package data of `pipeline.conf`)."""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def config_dir() -> str:
    """The absolute folder holding config.yaml."""
    for folder in (_PACKAGE.parent / "conf", _PACKAGE / "conf"):
        if (folder / "config.yaml").is_file():
            return str(folder)
    raise FileNotFoundError(f"no Hydra configs beside {_PACKAGE} (conf/config.yaml); reinstall the package")
