"""Accelerator topologies the planner compiles for, by the names Cloud TPU gives them, and their chips.

    topo = hardware.topology("v5p-16")      # Topology: chips, HBM and peak bf16 flops per chip
    devices = hardware.devices(topo)        # compile-only TPU devices (no TPU needed), or the local CPUs

Cloud TPU counts TensorCores in v4 / v5p names (v5p-8 = 4 chips of 2 cores run as one "megacore" device) and
chips in v5e / v6e names (v5e-8 = 8 chips). One JAX device is one chip in every topology here, so "per device"
and "per chip" are the same. Compile-only devices come from libtpu (`pip install jax[tpu]`), which XLA runs
without a TPU attached: `jax.experimental.topologies.get_topology_desc`.

Chip numbers are Google's published ones (HBM capacity, peak bf16 dense matmul flops, HBM bandwidth).
"""

from __future__ import annotations

import dataclasses
import os

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    kind: str  # jax's device_kind, checked against the compile-only devices
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bytes_per_s: float


CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 1228e9),
    "v5e": Chip("TPU v5 lite", 16 * GIB, 197e12, 819e9),
    "v5p": Chip("TPU v5", 95 * GIB, 459e12, 2765e9),
    "v6e": Chip("TPU v6 lite", 32 * GIB, 918e12, 1640e9),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as Cloud TPU writes it: v5p-16, v5e-8, ...; "cpu" for this machine's CPU devices
    chips: int
    chip: Chip | None  # None for cpu: no HBM limit, no peak (no roofline)
    topology_name: str = ""  # get_topology_desc arguments
    chip_config_name: str = "default"
    wrap: tuple[bool, bool, bool] = (False, False, False)

    @property
    def is_tpu(self) -> bool:
        return self.chip is not None


# (family, Cloud TPU number) -> chip grid. v4 / v5p: 3-D tori, the number counts cores (2 per chip);
# v5e / v6e: 2-D grids, the number counts chips.
_GRIDS = {
    "v4": {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8"},
    "v5p": {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8"},
    "v5e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    "v6e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
}


def names() -> list[str]:
    return ["cpu"] + [f"{family}-{n}" for family, grids in _GRIDS.items() for n in grids]


def topology(name: str) -> Topology:
    """The Topology of a Cloud TPU name (v5p-8, v5e-16, v4-8, ...) or "cpu"; ValueError naming the known ones."""
    if name == "cpu":
        import jax
        return Topology("cpu", len(jax.devices("cpu")), None)
    family, _, number = name.partition("-")
    grid = _GRIDS.get(family, {}).get(int(number)) if number.isdigit() else None
    if grid is None:
        raise ValueError(f"--topology={name!r}: unknown; expected one of {', '.join(names())}")
    dims = [int(d) for d in grid.split("x")]
    chips = 1
    for d in dims:
        chips *= d
    if len(dims) == 3:  # tori of 64 chips and more close every ring
        wrap = (chips >= 64,) * 3
    else:  # 2-D grids close a ring of 16
        wrap = (dims[0] >= 16, dims[1] >= 16, False)
    return Topology(name, chips, CHIPS[family], f"{family}:{grid}",
                    "megacore" if family == "v4" else "default", wrap)


def devices(topo: Topology) -> list:
    """The devices to build the mesh from: compile-only TPU devices of the topology, or the local CPUs."""
    import jax

    if not topo.is_tpu:
        return list(jax.devices("cpu"))
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server to ask
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu locks a file; other processes may hold it
    from jax.experimental import topologies

    # Off a TPU VM libtpu's start-up complains (on stderr) that it cannot tell the machine it runs on; it is
    # told here while it loads, and the environment is restored after (merit_jax.distributed reads it).
    quiet = {"TPU_ACCELERATOR_TYPE": topo.name, "TPU_WORKER_HOSTNAMES": "localhost"}
    added = [k for k in quiet if k not in os.environ]
    os.environ.update({k: quiet[k] for k in added})

    grid = [int(d) for d in topo.topology_name.split(":")[1].split("x")] + [1]
    hosts = tuple(min(2, g) for g in grid[:2]) + (1,)  # a TPU VM holds (up to) 2x2 chips
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.topology_name,
                                            chip_config_name=topo.chip_config_name, chips_per_host_bounds=hosts,
                                            num_slices=1, wrap=topo.wrap)
    except RuntimeError as e:
        hint = "; planning for TPU needs libtpu: pip install -r requirements.txt" if "not installed" in str(e) else ""
        raise RuntimeError(f"cannot compile for {topo.name}: {e}{hint}") from None
    finally:
        for k in added:
            os.environ.pop(k, None)
    found = list(desc.devices)
    if len(found) != topo.chips or found[0].device_kind != topo.chip.kind:
        raise RuntimeError(f"{topo.name}: libtpu gave {len(found)} {found[0].device_kind!r} devices, expected "
                           f"{topo.chips} {topo.chip.kind!r}")
    return found
