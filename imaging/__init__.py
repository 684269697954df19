"""Images in: decoding PNG, JPEG, BMP, TIFF and DICOM as untrusted input, the limits, the decoder sandbox,
and parallel loading. Knows nothing of models, Prefect or runs."""
