"""The stages after features: train, evaluate, register, package, monitor, and their MLflow wiring."""
