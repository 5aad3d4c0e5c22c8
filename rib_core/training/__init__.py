"""What every trained network shares (torch): backbones, checkpoints, image augmentation, IRN's
optimiser and the training loop the classifier, IRN and DeepLab trainers run on."""
