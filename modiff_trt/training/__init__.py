"""Training the packaged models (today: the `digits` UNet and its FID classifier).

Not needed to load or sample anything: the trained weights ship in `modiff_trt/assets/`; this
folder is how they were made and how to make them again.
"""
