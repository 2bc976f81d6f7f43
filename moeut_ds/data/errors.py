"""The one exception type of the data pipeline."""


class DataError(ValueError):
    """A dataset problem found before or during training.

    The message always names the problem and how to fix it, so a launcher can print it as is and exit.
    """
