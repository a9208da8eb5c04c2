"""The sampling inferer shared by every method."""

from ambisam.inferers.sampling import SAMPLING_CHANNELS, SlicewiseSamplingInferer, binary_entropy, split_sampling_output

__all__ = ["SAMPLING_CHANNELS", "SlicewiseSamplingInferer", "binary_entropy", "split_sampling_output"]
