"""Image sets: the Parquet format (`format`), MNIST (`mnist`), importers of other sets (`image_sets`), digit prompts
(`prompts`), the driver's prepare step (`prepare`), and the batches the loop trains on, in memory (`batches`) or
streamed (`streaming`).
"""
