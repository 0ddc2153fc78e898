"""launch/ scripts: the commands they send, with a stand-in `gcloud` that prints its arguments."""

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tpu_vm_setup_installs_jax_tpu_at_the_jax_version_of_requirements(tmp_path):
    gcloud = tmp_path / "gcloud"
    gcloud.write_text('#!/bin/sh\necho "gcloud $*"\n')
    gcloud.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", SETUP="1")
    proc = subprocess.run(["bash", "launch/tpu_vm.sh", "my-tpu", "us-central2-b", "configs/default.py", "/mnt/w", "0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    jax = re.search(r"^jax(\[[^]]*\])?==([^\s;#]+)", (ROOT / "requirements.txt").read_text(), re.M).group(2)
    install = next(line for line in proc.stdout.splitlines() if "pip install" in line)
    assert install.endswith(f"pip install -q -r requirements.txt 'jax[tpu]=={jax}'")
    assert "--stage train --branch 0" in proc.stdout.splitlines()[-1]
