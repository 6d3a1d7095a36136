"""EM U-Net pipeline: a paper-faithful U-Net (Ronneberger et al., MICCAI 2015) for
electron-microscopy segmentation, built on MONAI."""

__version__ = "0.1.0"
