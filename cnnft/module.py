"""The LightningModule that trains a network: pretraining (N-way) and fine-tuning (21-way).

CaffeNet (the default ``model``) is built from ``net``; any other model (``conf/model``) by
``cnnft.models.build.training_network``: pretraining gives it a head as wide as the data's
classes, fine-tuning loads ``pretrained=`` (a cnnft checkpoint of the same model, or a state
dict file; else ``model.weights``) into every layer but the head and gives it a new 21-way head.
The recipe's ``lr_mult: {fc8: 10}`` applies to that head (``cnnft.optim.layer_multipliers``).

Logged keys:

=====================  ==================================================
``train/loss``         cross-entropy of the global training batch (each step;
                       under DDP the mean of the processes' equal shares)
``train/lr``           the base learning rate (each layer's is a multiple of it)
``train/skipped``      images skipped as corrupt so far (``skip_corrupt``)
``val/loss``           mean cross-entropy on the validation set
``val/top1``           top-1 accuracy; ``val/top5`` top-5 (>= 5 classes)
``val/class_acc``      mean over classes of per-class accuracy (background
                       dominates fine-tuning windows; this does not let it)
=====================  ==================================================

Under DDP each process's loss is the mean over its equal share of the global batch and DDP
averages the gradients over processes, so the gradient is that of the global batch's mean
loss, as with one process. Dropout masks are keyed by (seed, step, position in the global
batch) (``cnnft.models.dropout``), so they do not depend on the number of processes either.
(Images skipped as corrupt, ``skip_corrupt``, leave a process's share short: that step's
gradient then weights the processes' samples slightly unequally.)
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cnnft import __version__
from cnnft.checkpoint import check_pretrained_format, load_pretrained, read_checkpoint
from cnnft.data.sampling import rng_for
from cnnft.freeze import FreezeScheme, apply_freeze, freezable, frozen_modules, head_of
from cnnft.models.build import check_same_model, family, model_label, training_network
from cnnft.models.caffenet import CaffeNet
from cnnft.models.dropout import global_batch_rows, use_global_batch_dropout
from cnnft.optim import caffe_sgd


class CaffeNetModule(L.LightningModule):
    """A network (CaffeNet unless ``model`` says otherwise) + Caffe's solver + a freezing scheme.

    Args:
        num_classes: fc8 width (from the data module).
        net: ``CaffeNet`` keyword arguments (``width``, ``input_size``, ``dropout``); unused
            for other models.
        optim: ``lr``, ``momentum``, ``weight_decay``, ``lr_step``, ``gamma``, and ``lr_mult``
            (layer -> multiplier; fine-tuning gives the new fc8 10x).
        freeze: a ``FreezeScheme`` as a dict (``name``, ``frozen``, ``reinit``, ``upto``).
        pretrained: checkpoint whose weights initialise every layer but fc8, or None.
        pretrained_format: its layout, ``cnnft`` or ``caffe`` (``cnnft.checkpoint.pretrained_state``).
        channels_last: run convolutions in NHWC memory format (faster on CPU).
        seed: base of the per-step dropout seeds (exact resume).
        run_config: the resolved run config, stored in every checkpoint.
        model: the resolved ``model`` node (``conf/model``); None: CaffeNet.
    """

    def __init__(self, num_classes: int, net: dict[str, Any], optim: dict[str, Any],
                 freeze: dict[str, Any] | None = None, pretrained: str | None = None,
                 pretrained_format: str = "cnnft", channels_last: bool = True, seed: int = 0,
                 run_config: dict[str, Any] | None = None, model: dict[str, Any] | None = None) -> None:
        super().__init__()
        model = dict(model or {"family": "caffenet"})
        if family(model) == "caffenet":
            check_pretrained_format(pretrained_format)
            self.net = CaffeNet(num_classes, **net)
            use_global_batch_dropout(self.net)
            if pretrained:
                check_same_model(read_checkpoint(pretrained), pretrained, model)
                load_pretrained(self.net, pretrained, fmt=pretrained_format)
            self.arch = {"width": self.net.width, "input_size": self.net.input_size,
                         "num_classes": num_classes}
        else:
            self.net = training_network(model, num_classes, pretrained)
            use_global_batch_dropout(self.net)
            self.arch = {"family": family(model), "name": model_label(model),
                         "input_size": self.net.input_size, "num_classes": num_classes,
                         "head": head_of(self.net)}
        self.scheme = FreezeScheme(**(freeze or {}), valid=freezable(self.net))
        self.frozen_layers = apply_freeze(self.net, self.scheme)
        self.optim_cfg, self.seed, self.channels_last = dict(optim), seed, channels_last
        # the layer lr_mult's `first_conv` key names (the demo recipe's conv1 x10)
        first = model.get("first_conv")
        self.first_conv = first if first not in (None, "???") else (
            "conv1" if family(model) == "caffenet" else None)
        self.run_config = run_config or {}
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.val_loss = MeanMetric()
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_class_acc = MulticlassAccuracy(num_classes, average="macro")
        self.val_top5 = (MulticlassAccuracy(num_classes, top_k=5, average="micro")
                         if num_classes >= 5 else None)
        self.register_buffer("skipped", torch.zeros((), dtype=torch.long), persistent=True)
        self._skipped = 0  # the buffer's value on the host: reading the buffer would sync a GPU

    def train(self, mode: bool = True) -> CaffeNetModule:
        """Frozen layers stay in eval mode whatever Lightning asks."""
        super().train(mode)
        for module in frozen_modules(self.net, self.frozen_layers):
            module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # anything drawing from the global RNG (dropout outside step samplers' batches): seed
        # it from the step so a resumed run is exact
        seed = rng_for(self.seed, 3, self.global_step, self.global_rank).integers(2**62)
        torch.manual_seed(int(seed))

    def on_train_start(self) -> None:
        self._skipped = int(self.skipped)  # restored from the checkpoint on a resume

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self._skipped += int(batch["skipped"])  # a host int (collate_skipping)
        if self._skipped:
            self.skipped.fill_(self._skipped)
            self.log("train/skipped", float(self._skipped), reduce_fx="max")
        if batch["images"].numel() == 0:
            return None
        if "positions" in batch:  # a step sampler's batch: dropout keyed by the global batch
            # (the trailing 0 stood for the rank when dropout drew from the per-rank global
            # RNG; kept so that one process draws the masks it drew before)
            seed = int(rng_for(self.seed, 3, self.global_step, 0).integers(2**62))
            with global_batch_rows(self.net, seed, batch["positions"], batch["global_size"]):
                logits = self(batch["images"])
        else:
            logits = self(batch["images"])
        loss = F.cross_entropy(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        group = self.optimizers().param_groups[0]
        self.log("train/lr", group["lr"] / group["lr_mult"])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if batch["images"].numel() == 0:
            return
        logits = self(batch["images"])
        labels = batch["labels"]
        self.val_loss.update(F.cross_entropy(logits, labels), weight=len(labels))
        self.val_top1.update(logits, labels)
        self.val_class_acc.update(logits, labels)
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/top1", self.val_top1, prog_bar=True)
        self.log("val/class_acc", self.val_class_acc)
        if self.val_top5 is not None:
            self.val_top5.update(logits, labels)
            self.log("val/top5", self.val_top5)

    def configure_optimizers(self) -> dict:
        return caffe_sgd(self.net, **self.optim_cfg, first_conv=self.first_conv)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cnnft"] = {"version": __version__, "arch": self.arch,
                               "freeze": {"name": self.scheme.name,
                                          "frozen": list(self.scheme.frozen),
                                          "reinit": list(self.scheme.reinit),
                                          **({"upto": self.scheme.upto, "resolved": self.frozen_layers}
                                             if self.scheme.upto else {})},
                               "config": self.run_config}
