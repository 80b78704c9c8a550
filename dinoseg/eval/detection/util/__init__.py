"""Box operations and padded batches shared by the detector, its loss and its data."""
