"""Loaders of datasets kept in their own on-disk formats; `precode_cli.data` is the front door.

Each module reads one format into `Parts`: uint8 or float images [N, C, H, W] with pixel values in
[0, 1] after `as_pixels`, labels and class names, either as a train and a test split or as one
pool that `precode_cli.data` splits deterministically.
"""
