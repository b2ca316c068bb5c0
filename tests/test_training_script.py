"""A training script written for the reference library runs unchanged; DDP ranks read disjoint
shards whose union is the single-process stream (torchrun, 2 CPU processes, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch


def test_reference_style_training_script_runs_unchanged(tiny_data):
    # The shape of a typical user script (CSC-style): split from CSV -> loaders -> loop.
    import torchvision.transforms.v2 as T

    from cellmap_data import CellMapDataLoader, CellMapDataSplit
    from cellmap_data.transforms.augment import Binarize, NaNtoNum
    from cellmap_data.utils import longest_common_substring

    classes = ["mito", "er"]
    input_arrays = {"input": {"shape": (1, 32, 32), "scale": (8, 8, 8)}}
    target_arrays = {"output": {"shape": (1, 32, 32), "scale": (8, 8, 8)}}
    spatial_transforms = {
        "mirror": {"axes": {"x": 0.5, "y": 0.5}},
        "transpose": {"axes": ["x", "y"]},
        "rotate": {"axes": {"x": [-180, 180], "y": [-180, 180]}},
    }
    datasplit = CellMapDataSplit(
        input_arrays=input_arrays,
        target_arrays=target_arrays,
        classes=classes,
        pad=True,
        csv_path=str(tiny_data.csv_path),
        train_raw_value_transforms=T.Compose([T.ToDtype(torch.float, scale=True), NaNtoNum({"nan": 0, "posinf": None, "neginf": None})]),
        val_raw_value_transforms=T.Compose([T.ToDtype(torch.float, scale=True), NaNtoNum({"nan": 0, "posinf": None, "neginf": None})]),
        target_value_transforms=T.Compose([T.ToDtype(torch.float), Binarize(0.5)]),
        spatial_transforms=spatial_transforms,
        device="cpu",
        class_relation_dict={"mito": ["er"], "er": ["mito"]},
    )
    validation_loader = CellMapDataLoader(datasplit.validation_blocks.to("cpu"), classes=classes, batch_size=4, is_train=False, device="cpu", num_workers=2)
    train_loader = CellMapDataLoader(
        datasplit.train_datasets_combined.to("cpu"), classes=classes, batch_size=4, iterations_per_epoch=5,
        weighted_sampler=True, device="cpu", is_train=True, num_workers=2, prefetch_factor=2, pin_memory=True,
        persistent_workers=True,
    )
    pos_weight = torch.tensor([train_loader.dataset.class_weights[c] for c in classes])
    assert torch.isfinite(pos_weight).all()
    model = torch.nn.Conv2d(1, len(classes), 3, padding=1)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    for epoch in range(2):
        train_loader.refresh()
        for i, batch in enumerate(train_loader.loader):
            if i >= 5:
                break
            inputs, targets = batch["input"], batch["output"]
            assert inputs.shape == (4, 1, 32, 32) and targets.shape == (4, 2, 32, 32)
            prediction = model(inputs / 255)
            mask = ~torch.isnan(targets)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                prediction[mask], targets[mask], pos_weight=pos_weight.view(1, 2, 1, 1).expand_as(targets)[mask]
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        with torch.no_grad():
            for batch in validation_loader.loader:
                model(batch["input"] / 255)
    assert len(losses) == 10 and all(torch.isfinite(torch.tensor(losses)))
    assert longest_common_substring("input_raw", "raw_input") in ("input", "_raw", "raw_")


def test_ddp_ranks_read_disjoint_shards_whose_union_is_the_single_stream(tiny_data, tmp_path):
    pairs = json.dumps([[str(d.raw_path), c.target_path] for d in tiny_data.datasets for c in d.crops])
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, torch, torch.distributed as dist
        from cellmap_data import CellMapDataLoader, CellMapDataset, CellMapMultiDataset
        dist.init_process_group("gloo")
        data = json.loads({pairs!r})
        datasets = [CellMapDataset(str(r), c, ["mito", "er"], {{"raw": {{"shape": (8, 8, 8), "scale": (8, 8, 8)}}}},
                                   {{"gt": {{"shape": (8, 8, 8), "scale": (8, 8, 8)}}}}, pad=True,
                                   spatial_transforms={{"rotate": {{"z": 180}}}}, seed=7) for r, c in data]
        loader = CellMapDataLoader(CellMapMultiDataset(datasets, ["mito", "er"], None, None), batch_size=3,
                                   iterations_per_epoch=4, weighted_sampler=True, seed=7, num_workers=1)
        seen = []
        for batch in loader:
            seen += [[int(i), float(torch.nan_to_num(r).sum())] for i, r in zip(batch["idx"], batch["raw"])]
        with open(os.path.join({str(tmp_path)!r}, f"rank{{dist.get_rank()}}.json"), "w") as f:
            json.dump(seen, f)
        dist.destroy_process_group()
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", str(script)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 12

    # The single-process stream of the same epoch with both ranks' share.
    from cellmap_data import CellMapDataLoader, CellMapDataset, CellMapMultiDataset

    datasets = [
        CellMapDataset(str(d.raw_path), c.target_path, ["mito", "er"], {"raw": {"shape": (8, 8, 8), "scale": (8, 8, 8)}},
                       {"gt": {"shape": (8, 8, 8), "scale": (8, 8, 8)}}, pad=True, spatial_transforms={"rotate": {"z": 180}}, seed=7)
        for d in tiny_data.datasets for c in d.crops
    ]
    single = CellMapDataLoader(CellMapMultiDataset(datasets, ["mito", "er"], None, None), batch_size=3,
                               iterations_per_epoch=8, weighted_sampler=True, seed=7, num_workers=1)
    plan = [p for b in single.plan_epoch(0) for p in b]
    # Positions in the epoch plan: rank r takes positions r, r+2, ...; same samples, same draws.
    stream_by_position = {}
    for batch in single:
        for i, r in zip(batch["idx"], batch["raw"]):
            stream_by_position[len(stream_by_position)] = [int(i), float(torch.nan_to_num(r).sum())]
    assert len(stream_by_position) == len(plan) == 24
    expected = [[stream_by_position[p] for p in range(r, 24, 2)] for r in range(2)]
    for r in range(2):
        assert ranks[r] == expected[r]
