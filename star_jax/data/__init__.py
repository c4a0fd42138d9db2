"""Data: TFDS datasets and their sources (`build`), strict reading of raw annotation files
(`annotations`), crop rules (`crop`), geometry and augmentation (`transforms`), training targets
(`targets`), the Grain input pipeline (`pipeline`), and the built-in synthetic faces (`synthetic`).
Records flow builder -> source -> pipeline -> batches."""
