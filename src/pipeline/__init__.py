"""AutoML pipelines: ordered steps (search, HPO, augmentation search, full training), each a normal run
whose outputs feed the next step by interpolation (`python pipeline.py pipeline=<name>`)."""
