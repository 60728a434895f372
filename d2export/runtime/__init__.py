"""Everything that runs a model and so needs torch: the run-time adapter layers, model loading,
calibration inputs and output comparison. Nothing on the merge path imports this package."""
