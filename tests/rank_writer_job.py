"""A prediction job for the multi-rank writer tests: a fixed "model" (position-dependent within
the tile, so overlapping tiles disagree and blending matters) over uneven bounds with overlap,
written by CellMapDatasetWriter. Rank and world size come from torchrun's environment.

usage: rank_writer_job.py RAW OUT OVERLAP DELAY_S [exist_ok]
"""

import sys
import time

import torch

from cellmap_data import CellMapDatasetWriter

TILE = (12, 12, 12)
BOUNDS = {"z": [8.0, 8.0 + 4 * 37], "y": [4.0, 4.0 + 4 * 41], "x": [0.0, 4 * 45]}


def main() -> None:
    raw, out, overlap, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    exist_ok = len(sys.argv) > 5 and sys.argv[5] == "exist_ok"
    writer = CellMapDatasetWriter(
        raw, out, ["mito", "er"], {"raw": {"shape": TILE, "scale": (4, 4, 4)}},
        {"pred": {"shape": TILE, "scale": (4, 4, 4)}}, target_bounds={"pred": BOUNDS},
        overlap=overlap, chunks=(8, 8, 8), downsample_levels=1, exist_ok=exist_ok)
    ramp = torch.linspace(0.5, 1.5, TILE[2])
    todo = writer.writer_indices
    print(f"rank {writer.rank}/{writer.world_size}: {len(todo)} of {len(writer)} tiles", flush=True)
    for batch in writer.loader(batch_size=3):
        x = batch["raw"]
        writer[batch["idx"]] = {"pred": torch.cat([x * ramp, (x + 1).sqrt() * ramp.flip(0)], dim=1)}
        if delay:
            time.sleep(delay)
    writer.close(timeout=120)


if __name__ == "__main__":
    main()
