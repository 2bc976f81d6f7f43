"""Token data for training: the prepared-dataset format, start-up checks and the window loader.

    from moeut_ds.data import open_dataset, WindowLoader, DataError

See docs/DATA.md for the format and the loader's semantics. This package never imports data_prep.
"""
from .dataset import EvalWindows, TokenDataset, open_dataset
from .errors import DataError
from .loader import WindowLoader

__all__ = ["open_dataset", "TokenDataset", "EvalWindows", "WindowLoader", "DataError"]
