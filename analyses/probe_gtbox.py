"""``probe_gtbox``: VOC07 ground-truth-box classification with linear SVMs on each layer
(paper Tables 1, 4).

Every ground-truth box is cropped with the context padding (16 px at paper scale), warped to
the input size and classified one-vs-rest; "difficult" boxes are excluded from evaluation (and
from training unless ``train_difficult=true``). Logged keys: ``probe_gtbox/<layer>/mAP`` and
``probe_gtbox/<layer>/<ablation>/mAP``.
"""

from __future__ import annotations

from cnnft.analysis import AnalysisContext
from cnnft.probing import ProbeAnalysis, ProbeSplit, gtbox_split


class ProbeGtbox(ProbeAnalysis):
    name = "probe_gtbox"
    title = "VOC07 ground-truth box classification: linear SVM per layer"

    def split(self, ctx: AnalysisContext, split: str) -> ProbeSplit:
        return gtbox_split(ctx, split)
