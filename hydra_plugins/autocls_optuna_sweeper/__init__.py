"""autocls's Optuna (>= 4) sweeper for Hydra: `hydra/sweeper=autocls_optuna` (see docs/hpo.md).

Hydra imports every module of the `hydra_plugins` namespace package at start-up to find plugins, so
the modules it scans (`optuna_sweeper`) import only Hydra; Optuna and the sweep loop (`_core`, skipped
by the scan because of its underscore) load when a sweep starts.
"""
