"""``probe_cls``: VOC07 image classification with linear SVMs on each layer (paper Tables 1, 2, 4).

Each VOC07 image is warped whole to the network's input size (``center_crop=true``: warped to
the resize size and centre-cropped, as in Caffe's test phase), passed once through the network,
and every requested layer's features (after each ablation) train one-vs-rest linear SVMs on
trainval (C by cross-validated AP) that are evaluated on test: per-class AP and mAP.
Logged keys: ``probe_cls/<layer>/mAP`` and ``probe_cls/<layer>/<ablation>/mAP``.
"""

from __future__ import annotations

from typing import Any

from cnnft.analysis import AnalysisContext
from cnnft.probing import ProbeAnalysis, ProbeSplit, image_split


class ProbeCls(ProbeAnalysis):
    name = "probe_cls"
    title = "VOC07 image classification: linear SVM per layer"

    def __init__(self, *, center_crop: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.center_crop = center_crop

    def split(self, ctx: AnalysisContext, split: str) -> ProbeSplit:
        return image_split(ctx, split, center_crop=self.center_crop)
