"""vitscale later stages (full fine-tuning, linear probe, kNN) built from pretrain's parts."""
