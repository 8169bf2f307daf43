"""Hydra presets, a package so that Hydra finds them inside an installed wheel (pkg://engram_train.conf)."""
