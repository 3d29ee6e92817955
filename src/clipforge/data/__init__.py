"""Data sources and indices: NSD index, HDF5 and image-folder sources, embedding caches."""
