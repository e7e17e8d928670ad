"""Drift between two outputs (`fruitpipe drift REFERENCE CURRENT`): a product over the classifier and the PCA basis
they hold, above classify/ and pipeline/ (the monitor package below holds the batch commands' own health)."""
