"""uservalue: predict each user's future value from their behaviour log."""

__version__ = "0.1.0"
