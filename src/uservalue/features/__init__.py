"""The one feature definition (sql) and the feature sets written for training and evaluation (store)."""
