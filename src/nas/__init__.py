"""Architecture search parts shared by the search LightningModules: the DARTS space (operations,
genotypes, supernet, architect, derivation), evolution and Pareto selection (CARS, BackboneNAS),
and per-op cost tables. Imports nothing eagerly; configs name the modules directly."""
