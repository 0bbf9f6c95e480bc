"""The label pipeline: expert runs into a label store, label text embeddings + PCA, the feeder
that turns labels into model inputs, and the gallery."""
