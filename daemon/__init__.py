"""vouchd: a node daemon that vouches for the processes on its host with hardware proof."""

__version__ = "0.1.0"
