"""densebench: how good are this encoder's patch features?

Four published dense-feature protocols (in-context retrieval segmentation, linear probes,
overclustering, SPair-71k correspondence) on any encoder, with results users can trust.
"""

__version__ = "0.1.0"
