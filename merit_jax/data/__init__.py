"""The task-mixture data layer: readers, tokenisation, held-out/calibration splits, packing, synthetic mixture."""
