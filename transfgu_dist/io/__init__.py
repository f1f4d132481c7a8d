"""Reading and writing: one storage layer for local paths and s3:// (atomic writes, stage outputs with a commit
manifest), Parquet parts, image and label decoding, dataset layouts and label maps, the synthetic scenes, encoder
weights, the concepts file and the pseudo-label bank's stored form, and images fed to Ray Data actor pools."""
