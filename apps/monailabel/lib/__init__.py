"""The ambisam MONAI Label app's tasks: inference, training, active learning, prompts and bundle selection."""
