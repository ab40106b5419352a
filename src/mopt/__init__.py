"""mopt: run NVIDIA ModelOpt checkpoints."""
