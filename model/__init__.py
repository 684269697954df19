"""Pure machine learning: network, preprocessing contract, training, evaluation, the model bundle."""

import os

# TensorFlow turns its oneDNN kernels on by default only on some CPUs. Where it leaves them off
# (AMD EPYC with AVX2 among them) they make VGG16's batched forward pass about 17% faster
# (bench/screen_bench.py). TensorFlow reads this when it first runs an op, so setting it here, before
# any model is built, is early enough. An explicit value from the user wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
