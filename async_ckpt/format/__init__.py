"""The on-disk format (docs/FORMAT.md): names, array dtypes, the typed tree, the manifest.

Pure data and validation, no IO: storage backends move the bytes, the commit module
decides when a step is visible.
"""
