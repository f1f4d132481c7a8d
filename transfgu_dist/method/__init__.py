"""The paper's method in plain PyTorch: the frozen ViT encoder with its explicit last-layer CLS attention (Eqs 1-4),
sliding-window crops and the foreground prior, k-means concepts, batched Grad-CAM (Eqs 5-7), training targets
(Eqs 6, 8, 10-12), the Segmenter decoder, the losses (Eqs 9, 11, 13-16), augmentations, the bootstrapping step, the
Hungarian metric and dense CRF. Nothing here reads storage or imports Ray (tests/test_layout.py checks it)."""
