"""Training: the loop (`trainer`), the engines that take optimizer steps (`engines`: local/DDP and
DeepSpeed, checkpoints, optimizers and schedules, the metrics log, stdin control), exporting a
checkpoint as one model file (`export`) and plotting the metrics (`plot`)."""
