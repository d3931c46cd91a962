"""Networks with named sub-layers."""

from cnnft.models.caffenet import PROBE_LAYERS, CaffeNet, caffe_init_

__all__ = ["PROBE_LAYERS", "CaffeNet", "caffe_init_"]
