"""Pure machine learning: network, preprocessing contract, training, evaluation, the model bundle.

Free of Prefect, storage and the environment: importing it changes nothing (``cli.bootstrap``
sets process options).
"""
