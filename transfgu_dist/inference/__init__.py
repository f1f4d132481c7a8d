"""Applying a trained model: the Segmenter (encoder + decoder + cluster -> class matching) and its checkpoints,
predict over a folder or s3:// prefix on Ray, the self-contained export, the MLflow pyfunc model, and the overlay
pictures with legends."""
