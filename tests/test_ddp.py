"""DDP on CPU: two gloo processes launched by Lightning from the real CLI, against one process.

The recipe's batch sizes are global, so two processes train on the same global batch per step
as one process (each on half of it), with the same augmentation and dropout masks (keyed by
the sample's position in the global batch), and reach the same weights up to float rounding.
Dropout stays on (0.5, the recipe's). Validation shards without padding: no sample counts twice.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnft.checkpoint import read_checkpoint
from cnnft.errors import ConfigError
from cnnft.train import build, train
from tests.conftest import TINY_RUN

# 9 validation images: a padding sampler would give one of them to both ranks
SAME_RUN = ["+callbacks.record._target_=tests.record_batches.RecordBatches",
            "+datamodule.max_val_samples=9"]


@pytest.fixture(scope="module")
def ddp_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One pretraining run (6 steps, global batch 8) with two gloo processes, from the CLI."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    overrides = [o for o in TINY_RUN if not o.startswith("logger=")]
    cmd = [sys.executable, "-m", "cnnft.train", "trainer=ddp", "trainer.accelerator=cpu",
           "trainer.devices=2", "logger=wandb", f"paths.data_dir={data_dir}",
           f"hydra.run.dir={run}", *overrides, *SAME_RUN]
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def test_ddp_two_cpu_processes_one_checkpoint_one_wandb_run(ddp_run: Path) -> None:
    run = ddp_run
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 6
    wandb_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1, wandb_runs
    assert (run / "train_ddp_process_1.log").exists()  # the second rank ran in the same dir


def _metric(run: Path, key: str) -> dict[int, float]:
    with (run / "csv" / "metrics.csv").open() as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def test_one_and_two_processes_train_on_the_same_global_batches(ddp_run: Path, tiny_cfg,
                                                                 tmp_path: Path) -> None:
    one = tmp_path / "one"
    train(tiny_cfg(*SAME_RUN, output_dir=one))

    # the same global sample keys (index, augmentation seed, position) at every step
    single = json.loads((one / "batches_rank0.json").read_text())
    ranks = [json.loads((ddp_run / f"batches_rank{r}.json").read_text()) for r in (0, 1)]
    assert single["world_size"] == 1 and [r["world_size"] for r in ranks] == [2, 2]
    assert sorted(single["steps"]) == sorted(ranks[0]["steps"]) == [str(s) for s in range(6)]
    for step, mine in single["steps"].items():
        shares = [r["steps"][step] for r in ranks]
        assert [len(s["keys"]) for s in shares] == [4, 4]  # 8 per step in all, not 2 x 8
        merged = sorted((k for s in shares for k in s["keys"]), key=lambda k: k[2])
        assert merged == mine["keys"], step
        # what was loaded is what the sampler gave: labels at their global positions
        labels = {p: lab for s in shares for p, lab in zip(s["positions"], s["labels"], strict=True)}
        assert [labels[p] for p in mine["positions"]] == mine["labels"]

    # the loss of each step's global batch, and validation on the same 9 images, agree
    for key in ("train/loss", "val/loss", "val/top1"):
        a, b = _metric(one, key), _metric(ddp_run, key)
        assert a.keys() == b.keys() and a, key
        assert all(abs(a[s] - b[s]) <= 1e-5 * max(1.0, abs(a[s])) for s in a), (key, a, b)

    # and the weights after 6 SGD steps
    wa = read_checkpoint(one / "checkpoints" / "last.ckpt")["state_dict"]
    wb = read_checkpoint(ddp_run / "checkpoints" / "last.ckpt")["state_dict"]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6, msg=k)


def test_a_global_batch_that_does_not_divide_among_processes_is_refused(tiny_cfg,
                                                                      tmp_path: Path) -> None:
    """Refused before training starts and before anything is written to the run directory."""
    run = tmp_path / "refused"
    cfg = tiny_cfg("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                   "recipe.pretrain.batch_size=9", output_dir=run)
    with pytest.raises(ConfigError, match="datamodule.batch_size=9 counts samples of the global "
                       r"batch \(split across processes, never multiplied by them\) and does not "
                       r"divide among 2 processes \(trainer.devices x trainer.num_nodes\)"):
        train(cfg)
    assert not (run / "config.yaml").exists()


@pytest.mark.parametrize(("overrides", "message"), [
    (["recipe.finetune.fg_per_batch=3"], "datamodule.fg_per_batch=3 counts"),
    (["recipe.finetune.batch_size=6", "recipe.finetune.fg_per_batch=2"],
     "datamodule.batch_size=6 counts"),
])
def test_finetune_batch_split_must_divide(tiny_cfg, overrides: list[str], message: str) -> None:
    """Fine-tuning's foreground count is global too (the background count then divides)."""
    datamodule = build(tiny_cfg("stage=finetune", *overrides).datamodule)
    datamodule.check_world_size(1)
    with pytest.raises(ConfigError, match=f"{message} .* does not divide among 4 processes"):
        datamodule.check_world_size(4)


def test_global_batch_dropout_masks_do_not_depend_on_the_split() -> None:
    """Two processes' rows of the global mask are the one process's; with one process the
    masks are nn.Dropout's under the same seed (single-process runs unchanged)."""
    from torch import nn

    from cnnft.models.dropout import global_batch_rows, use_global_batch_dropout

    net = nn.Sequential(nn.Linear(5, 64), nn.Dropout(0.5), nn.Linear(64, 64), nn.Dropout(0.5))
    plain = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    x = torch.randn(8, 5)
    torch.manual_seed(1234)
    expected = net(x)
    use_global_batch_dropout(net)
    assert all(type(m).__name__ == "GlobalBatchDropout" for m in net if isinstance(m, nn.Dropout))
    assert len(plain) == 2
    with global_batch_rows(net, 1234, torch.arange(8), 8):
        whole = net(x)
    assert torch.equal(whole, expected)
    for rows in (torch.tensor([0, 1, 4, 5]), torch.tensor([2, 3, 6, 7])):  # fg/bg-style shares
        with global_batch_rows(net, 1234, rows, 8):
            assert torch.equal(net(x[rows]), whole[rows])
    with global_batch_rows(net, 99, torch.arange(8), 8):
        assert not torch.equal(net(x), whole)
    net.eval()
    assert torch.equal(net(x), net[2](net[0](x)))


def test_validation_shards_neither_duplicate_nor_drop(data_dir: Path) -> None:
    """Two ranks' validation loaders cover the 9 images once between them (a padding sampler
    would give one image to both), in shards that ``features.extract`` gathers by index."""
    from types import SimpleNamespace

    from cnnft.data.datamodules import ImageNetDataModule
    from cnnft.features import merge_shards

    dm = ImageNetDataModule(str(data_dir / "demo" / "imagenet"), resize=76, crop=67,
                            num_workers=0, batch_size=4, max_val_samples=9)
    dm.setup()
    shards = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, global_step=0)
        loader = dm.val_dataloader()
        indices = list(loader.sampler)
        labels = torch.cat([b["labels"] for b in loader])
        shards.append((indices, labels))
    assert sorted(i for ind, _ in shards for i in ind) == list(range(9))
    assert [len(ind) for ind, _ in shards] == [5, 4]
    every = torch.tensor([label for _, label in dm.val_set.samples])
    assert torch.equal(merge_shards(shards, 9), every)
