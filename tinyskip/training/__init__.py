"""Training: the from-scratch LayerSkip loop, exit modules on a frozen backbone, losses, resume."""
