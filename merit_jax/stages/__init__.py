"""Stage drivers: ConfigDict -> settings -> library -> artifacts. Nothing below them imports them."""

import pathlib

from merit_jax import config
from merit_jax import artifacts as wd


def theta0_of(cfg, workdir: pathlib.Path) -> pathlib.Path:
    """θ⁰ of the run: WORKDIR/basin when the basin stage is on, else model.hf_path."""
    return wd.theta0_dir(workdir, basin=config.basin_settings(cfg).enabled, hf_path=config.model_settings(cfg).hf_path)
