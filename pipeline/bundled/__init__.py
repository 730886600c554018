"""Files shipped with the package (configs/ and data/example/ of the source tree): see pipeline/resources.py."""
