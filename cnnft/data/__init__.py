"""Dataset readers (ImageNet and PASCAL VOC layouts), image decoding and the demo-data generator."""
