"""Pure machine learning: network, preprocessing contract, training, evaluation, the model bundle."""

import os

# TensorFlow picks its oneDNN default from the CPU. Where it leaves the kernels off (an AVX2 AMD
# EPYC, for one), turning them on makes VGG16's batched forward pass about 15% faster
# (bench/screen_bench.py). TensorFlow reads part of it at import, so this must run before anything
# imports TensorFlow: tasks/ and flows/ import this package first. An explicit value from the user wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
