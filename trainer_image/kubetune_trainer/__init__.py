"""kubetune's trainer: runs in every training pod under torchrun, and locally under `kubetune run`.

torchrun --nproc-per-node 2 -m kubetune_trainer --config trainer-config.yaml
python -m kubetune_trainer --config trainer-config.yaml --set training.maxSteps=5
"""
