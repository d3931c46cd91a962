"""cnnft: train convolutional networks and measure what their layers learn."""

__version__ = "0.1.0"
