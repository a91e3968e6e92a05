"""Datasets: the label index, the embedded demo dataset and the torch/DALI loaders."""

from timm_cskd.data.index import DataIndexError, ImageIndex, build_index, read_list_file, scan_image_folder

__all__ = ["DataIndexError", "ImageIndex", "build_index", "read_list_file", "scan_image_folder"]
