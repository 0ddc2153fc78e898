"""The stage drivers: `run(cfg, workdir, ...)` reads the config into typed settings, reads the stage's inputs
from the work directory, calls the library and writes the stage's outputs. Nothing in the library imports them."""
