"""TransFGU (Yin et al., ECCV 2022) on Ray: unsupervised semantic segmentation of an unlabeled image collection.

Subpackages, each importing only those listed before it: `config` (typed settings, presets, profiles), `method`
(the paper's math, plain PyTorch), `io` (storage, data, stored forms), `inference` (applying a trained model), and
`pipeline` (the stages on Ray and the command line). The jobs in `jobs/` are the entry points.
"""
