"""The shared core: model anatomy, loading, data, the layer-wise runner and run directories."""
