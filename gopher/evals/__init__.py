"""Zero-shot evaluation: benchmark task files (`tasks`) and the scoring that runs a model on them."""
